"""The mailsvc benchmark: `make bench` (or `python -m bench.run`) runs it."""
