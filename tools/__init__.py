"""Research and maintenance tools of the qat_ste repository (not installed with the package).

Run them from the repository root as modules, e.g. ``python -m tools.coverage --subset ci``;
tests import them as ``tools.<name>`` (pytest puts the repository root on the path, see
``[tool.pytest.ini_options] pythonpath`` in pyproject.toml).

- ``tools.coverage_lib``: quantize torchvision/timm models and compare the sites with a census;
  ``tools.coverage``: its command line (the tables in ``docs/coverage_*.md``).
- ``tools.theory``: [P1]'s two-linear-layer model in closed form and by Monte Carlo;
  ``tools.theory_figures``: its figures.
- ``tools.p2_experiment``: [P2]'s coarse-gradient experiment.
- ``tools.reproduce_paper``: [P1]'s Table 1 grid and instability runs (``model_zoo/RESULTS.md``).
- ``tools.bench_quant``, ``tools.bench_train``, ``tools.bench_onnx``: benchmarks.
- ``tools.bench_deploy`` (with ``tools.deploy_lib``): float vs our deploy file vs ONNX Runtime's
  ``quantize_static``, in ONNX Runtime and OpenVINO.
"""
