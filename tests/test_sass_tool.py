"""tools/sass.py's reading of a cuobjdump listing: opcodes without predicates or modifiers,
and loops as the spans of branches back."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sass_tool", ROOT / "tools" / "sass.py")
sass_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_tool)

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
                                                                          /* 0x000fe40000000f00 */
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0020*/                   MUFU.EX2 R3, R3 ;
        /*0030*/              @!P0 BRA 0x60 ;
        /*0040*/                   ISETP.GE.AND P1, PT, R2, R5, PT ;
        /*0050*/                   FSEL R4, R4, -INF , P1 ;
        /*0060*/                   MUFU.EX2 R4, R4 ;
        /*0070*/              @!P2 BRA 0x10 ;
        /*0080*/              @P3 BRA.U 0x0 ;
        /*0090*/                   EXIT ;
"""


def test_opcodes_lose_predicate_and_modifiers():
    assert sass_tool.opcode("@!P0 BRA 0x60") == "BRA"
    assert sass_tool.opcode("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT") == "HGMMA"


def test_loops_are_the_spans_of_branches_back():
    found = sass_tool.loops(LISTING)
    assert [(first, last) for first, last, _ in found] == [(0x0, 0x80), (0x10, 0x70)]
    inner = found[1][2]
    assert inner == {"HGMMA": 1, "MUFU": 2, "BRA": 2, "ISETP": 1, "FSEL": 1}
    assert sass_tool.loops(LISTING, min_size=8) == found[:1]
