"""The benchmarks of peft-infosteer (not shipped in the wheel). Run each from the repository root as a module:
``python -m benchmarks.efficacy --help``; see benchmarks/README.md."""
