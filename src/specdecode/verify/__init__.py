"""Verifiers, one file each, looked up by name."""

from specdecode.errors import SpecDecodeError
from specdecode.verify.base import Verdict, Verifier
from specdecode.verify.greedy import GreedyVerifier
from specdecode.verify.lossy_typical import TypicalAcceptanceVerifier
from specdecode.verify.rejection import RejectionVerifier
from specdecode.verify.rrs_without_replacement import RecursiveRejectionVerifier
from specdecode.verify.specinfer import SpecInferVerifier
from specdecode.verify.spectr import SpecTrVerifier
from specdecode.verify.traversal import TraversalVerifier

VERIFIERS: dict[str, type[Verifier]] = {
    cls.name: cls
    for cls in (
        GreedyVerifier,
        RejectionVerifier,
        SpecInferVerifier,
        RecursiveRejectionVerifier,
        SpecTrVerifier,
        TraversalVerifier,
        TypicalAcceptanceVerifier,
    )
}
# The greedy verifier walks trees as well as chains; the name the tree papers use for it.
VERIFIERS["greedy-tree"] = GreedyVerifier


def make_verifier(name: str) -> Verifier:
    try:
        return VERIFIERS[name]()
    except KeyError:
        known = ", ".join(sorted(VERIFIERS))
        raise SpecDecodeError(f"unknown verifier {name!r}; choose one of: {known}") from None


__all__ = ["VERIFIERS", "Verdict", "Verifier", "make_verifier"]
