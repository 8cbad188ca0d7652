"""A load generator for Vigil: N concurrent WebRTC streams replaying one pre-encoded VP8 clip.

The clip (a plain scene with a red disc at known seconds) is encoded once and cached; every stream replays
the same packets with its own timing, so the generator costs little more than packetizing and encrypting
RTP and can share a small machine with the Vigil it measures. `python -m load_tests --help` lists the
options; `load_tests/README.md` has the commands and what the report means.
"""
