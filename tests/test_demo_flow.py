"""`kdforge demo flow` end to end (quick size): a Glow trained by maximum likelihood, distilled by flow_kd into a
student pair, and anonymisation with a secret key through both; the report's tables say what the story needs."""
from __future__ import annotations

import math

from kdforge.cli import build_parser
from kdforge.config import load_config


def _tables(text: str) -> list[dict[str, list[float]]]:
    """Each markdown table of `text` as {first cell: the other cells as floats}, header and rule left out."""
    tables, rows = [], None
    for line in text.splitlines() + [""]:
        if line.startswith("| "):
            if rows is None:
                rows = {}  # the header row
            elif not line.startswith("| ---"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                rows[cells[0]] = [float(c.rstrip("kMx").strip()) for c in cells[1:]]
        elif rows is not None:
            tables.append(rows)
            rows = None
    return tables


def test_demo_flow_quick(tmp_path, single_thread):
    from kdforge.demo_flow import PAIRINGS, WRONG_DISTANCES, run_flow_demo

    out = tmp_path / "flow"
    table = run_flow_demo(out, quick=True, progress=False)
    report = (out / "report.md").read_text()
    assert table in report and "Reading (this run)" in report
    assert (out / "anonymisation.png").is_file()
    for name in ("teacher", "students"):
        assert (out / name / "report.md").is_file() and (out / name / "checkpoints" / "last.pt").is_file()
    cfg = load_config(out / "students" / "config.yaml")  # the students were distilled from the demo's own Glow
    assert cfg.method.name == "flow_kd" and cfg.teacher.weights == str(out / "teacher" / "checkpoints" / "last.pt")
    assert load_config(out / "teacher" / "config.yaml").method.name == "flow_mle"

    recon, cost, anon = _tables(table)
    assert list(recon) == list(anon) == list(PAIRINGS)
    psnr, _, max_err = recon["Glow (teacher)"]
    assert max_err < 1e-3 and psnr > 80  # the flow is exactly invertible, up to float rounding
    assert all(math.isfinite(v) for row in recon.values() for v in row)
    assert list(cost) == ["Glow decoder", "student decoder", "Glow encoder", "student encoder"]
    assert cost["student decoder"][0] < cost["Glow decoder"][0]  # fewer parameters
    assert cost["student decoder"][1] < cost["Glow decoder"][1]  # fewer MACs an image
    assert cost["Glow decoder"][3] == cost["Glow encoder"][3] == 1.0  # speed-ups are against the Glow

    fake, right, right_8bit, *wrong = anon["Glow (teacher)"]
    assert len(wrong) == len(WRONG_DISTANCES)
    assert right > 80 and right > right_8bit > wrong[-1]  # the key undoes the rotation, exactly with float fakes
    assert wrong[0] > wrong[-1]  # a close guess recovers more than a blind one
    assert fake < 25 and wrong[-1] < 25  # the fake, and the blind guess's recovery, are other images
    for row in anon.values():
        assert all(math.isfinite(v) for v in row)


def test_demo_flow_is_a_cli_choice():
    args = build_parser().parse_args(["demo", "flow", "--quick", "--out", "x"])
    assert (args.name, args.quick, args.out) == ("flow", True, "x")
