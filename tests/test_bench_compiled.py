"""benchmarks/experiments/compiled.py: a smoke run, and the report's verdicts."""

from benchmarks import __main__ as cli
from benchmarks.experiments import compiled as B
from benchmarks.schema import read_results


def test_smoke_compiles_every_program_and_renders(tmp_path):
  assert cli.main(["compiled", "--smoke", "--targets", "cpu", "--out", str(tmp_path)]) == 0
  doc = read_results(tmp_path / "compiled.json")
  assert doc["meta"]["targets"] == ["cpu"]
  assert {(r["target"], r["leaves"]) for r in doc["details"]} == {("cpu", 1), ("cpu", 63)}
  for r in doc["details"]:
    assert set(r["programs"]) == set(B.SPEC.blocks)
    assert r["ratios"]["adamw"] == {"bytes": 1.0, "cycles": None, "h100_time": 1.0}
    assert all(p["bytes"] > 0 for p in r["programs"].values())
    assert r["programs"]["plain step"]["conditionals_executed"] == 0
    assert r["programs"]["unhinted"]["conditionals_executed"] == 1
  md = B.render({"compiled": doc})["benchmarks/results/compiled.md"]
  assert "| cpu | 1e+05 | 1 | unhinted |" in md
  assert f"python -m benchmarks compiled --smoke --targets cpu --out {tmp_path}" in md
  # A run of other targets keeps these, as a subset run of the committed results must.
  kept = {**doc["details"][0], "target": "h100"}
  (tmp_path / "compiled.json").write_text((tmp_path / "compiled.json").read_text().replace(
      '"target": "cpu"', '"target": "h100"'))
  assert cli.main(["compiled", "--smoke", "--targets", "cpu", "--out", str(tmp_path)]) == 0
  doc = read_results(tmp_path / "compiled.json")
  assert doc["meta"]["targets"] == ["cpu", "h100"]
  assert sorted(r["target"] for r in doc["details"]) == ["cpu", "cpu", "h100", "h100"]
  assert kept in doc["details"]


def _result(target, n, leaves, refresh, plain=None, kernels=10):
  ratios = {"refresh": {"bytes": refresh, "cycles": refresh, "h100_time": refresh}}
  programs = {"refresh": {"kernels": kernels}}
  if plain is not None:
    ratios["plain step"] = {"bytes": plain, "cycles": plain, "h100_time": plain}
    programs["plain step"] = {"kernels": kernels}
  return {"target": target, "n": n, "leaves": leaves, "ratios": ratios, "programs": programs}


def test_verdicts_count_the_target_sizes_only():
  details = [_result("tpu-v5e", 10**7, 1, 1.5, plain=1.01),
             _result("tpu-v5e", 10**8, 63, 2.5, plain=1.06),
             _result("tpu-v5e", 10**6, 1, 9.0, plain=9.0),  # not a target size
             _result("h100", 10**7, 1, 1.0, kernels=43),
             _result("h100", 10**6, 63, 7.0, kernels=30),  # not a target size
             _result("cpu", 10**7, 1, 9.0, plain=9.0)]  # the CPU is not a target
  lines = B.verdicts(details).splitlines()
  assert lines == [
      "- refresh, bytes ≤ 2: 2 of 3 met, 1.00–2.50; worst 2.5 (tpu-v5e, N=1e+08, 63 leaves)",
      "- refresh, TPU v5e cycles ≤ 2: 1 of 2 met, 1.50–2.50; worst 2.5 (tpu-v5e, N=1e+08, "
      "63 leaves)",
      "- refresh, H100 time model ≤ 3: 1 of 1 met, 1.00; worst 1 (h100, N=1e+07, 1 leaves)",
      "- refresh, H100 kernels ≤ 40 + 2 per leaf: 0 of 1 met, 43; worst 43 (h100, N=1e+07, "
      "1 leaves)",
      "- plain step, bytes ≤ 1.05: 1 of 2 met, 1.01–1.06; worst 1.06 (tpu-v5e, N=1e+08, "
      "63 leaves)",
      "- at N=1e+06, not a target size: refresh, bytes 7.00–9.00; refresh, TPU v5e cycles 9.00; "
      "refresh, H100 time model 7.00; refresh, H100 kernels 30; plain step, bytes 9.00"]


def test_committed_reports_and_docs_blocks_are_rendered_from_the_results():
  from benchmarks import render
  stale = [p for p, text in render.outputs().items() if p.read_text() != text]
  assert not stale, f"run `python -m benchmarks render`; stale: {stale}"
