"""`python -m bench.ttft`: see bench/ttft/__init__.py."""

from bench.ttft.cli import main

if __name__ == "__main__":
    main()
