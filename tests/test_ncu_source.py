"""bench/ncu_source.py on a made-up source page: the preamble skipped, opcodes without
predicates or modifiers, samples and executions summed per reason and per basic block."""
import gzip
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ncu_source", ROOT / "bench" / "ncu_source.py")
ncu_source = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ncu_source)

PAGE = '''"Kernel Name","void k(P)",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_long_sb","stall_wait","stall_long_sb (Not Issued)"
"0x10","      LDS.64 R6, [R18+0x2c000]","3","1,000","1","2","9"
"0x20","      FFMA.FTZ R184, R184, UR30, -R6","40","1,000","38","2","9"
"0x30","@!P0  BRA 0x10","7","4,000","0","7","9"
"0x40","      EXIT","0","1","0","0","0"
'''


@pytest.fixture
def page(tmp_path):
    path = tmp_path / "page.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(PAGE)
    return str(path)


def test_load_skips_the_preamble_and_reads_every_instruction(page):
    header, data = ncu_source.load(page)
    assert header[:2] == ["Address", "Source"]
    assert [ncu_source.opcode(d["Source"]) for d in data] == ["LDS", "FFMA", "BRA", "EXIT"]
    assert ncu_source.reasons(header) == ["stall_long_sb", "stall_wait"]
    assert ncu_source.number(data[2]["Instructions Executed"]) == 4000


def test_summary_and_blocks(page, capsys):
    assert ncu_source.main([page, "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 instructions, 0.0 M warp instructions executed, 50 samples" in out
    assert "long_sb 78.0%, wait 22.0%" in out
    assert "FFMA.FTZ" in out.splitlines()[-1] and "long_sb:38" in out.splitlines()[-1]
    assert ncu_source.main([page, "--blocks", "2"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows[0].split()[:4] == ["2-", "2", "1", "4k"]
    assert rows[1].split()[:4] == ["0-", "1", "2", "1k"]
