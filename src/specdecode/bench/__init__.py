"""The benchmark: every method against the plain-decoding baseline, interleaved in one process."""
