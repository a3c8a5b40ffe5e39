"""The swap path's Triton kernels compiled for Hopper (sm_90) on this machine, no GPU needed, and
where get_config takes a swap entry.

Their correctness runs under the CPU interpreter in test_kernels.py; what the interpreter cannot
show is what the GPU build does with an expert's up to 160 or 256 token columns held as fp32
accumulators: spilled registers, or more shared memory than a block may use. Every swap config of
the shipped device tables is compiled here with the specialisations Triton's launcher gives real
tensors (16-byte aligned pointers, strides and sizes divisible by 16)."""

import json

import pytest

from conftest import assert_unspilled
from moegps.kernels import launch
from moegps.kernels.launch import CONFIG_DIR

COMPILE = r"""
import base64, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moegps.kernels import swap_moe

gemm, block_m, tile = json.loads(sys.argv[1])
box = f"tensordesc<bf16[{tile['block_n']}, {tile['block_k']}]>"
if gemm == "gate_up":
    kernel = swap_moe.gate_up_swap_kernel
    signature = {"x_ptr": "*bf16", "w_ptr": box, "h_ptr": "*bf16"}
    strides = ("stride_xt", "stride_we", "stride_wn", "stride_hm")
else:
    kernel = swap_moe.down_swap_kernel
    signature = {"h_ptr": "*bf16", "w_ptr": box, "out_ptr": "*bf16", "weights_ptr": "*bf16"}
    strides = ("stride_hm", "stride_we", "stride_wn", "stride_om")
signature |= {"sorted_ptr": "*i32", "block_expert_ptr": "*i32", "block_start_ptr": "*i32",
              "n_blocks_ptr": "*i32"}
signature |= {name: "i32" for name in ("n_pairs", "top_k", "H", "F", "num_pid_m", "group_m", *strides)}
constants = {"BLOCK_M": block_m, "BLOCK_N": tile["block_n"], "BLOCK_K": tile["block_k"], "EVEN_K": True,
             "TMA": True, "PDL": True, **({"COMBINE": False} if gemm == "down" else {})}
signature |= dict.fromkeys(constants, "constexpr")
names = list(signature)
aligned = [n for n in names if signature[n].startswith("*") or n in ("H", "F", *strides)]
source = ASTSource(kernel, signature=signature, constexprs=constants,
                   attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": tile["num_warps"], "num_stages": tile["num_stages"]})
print(json.dumps({"wgmma": "wgmma.mma_async" in compiled.asm["ptx"], "shared": compiled.metadata.shared,
                  "tanh": "tanh.approx.f32" in compiled.asm["ptx"],
                  "warps": compiled.metadata.num_warps,
                  "cubin": base64.b64encode(compiled.asm["cubin"]).decode()}))
"""


def shipped_swap_gemms() -> list:
    """(gemm, block_m, tile) of every swap config in the shipped tables, each once."""
    found = set()
    for path in sorted(CONFIG_DIR.glob("*.json")):
        for by_tokens in json.loads(path.read_text())["shapes"].values():
            for config in by_tokens.values():
                if config["path"] == "swap":
                    for gemm in ("gate_up", "down"):
                        found.add((gemm, config["block_m"], json.dumps(config[gemm], sort_keys=True)))
    return sorted(found)


@pytest.mark.parametrize("gemm, block_m, tile", shipped_swap_gemms())
def test_shipped_swap_configs_compile_for_hopper_unspilled(gemm, block_m, tile, compiling_python):
    result = compiling_python(COMPILE, json.dumps([gemm, block_m, json.loads(tile)]))
    assert result["wgmma"]  # the tensor cores' Hopper instruction
    assert result["tanh"] == (gemm == "gate_up")  # fused_moe.silu_mul's one MUFU op an element
    assert result["shared"] <= 227 * 1024
    # (the one spill once shipped, 192-row blocks against 256 weight rows in the down GEMM of the
    # Mixtral 640 entry, went with that entry to the wgmma swap kernels: NOTES.md session 16)
    assert_unspilled(result["cubin"], result["warps"])


def test_the_tables_ship_a_swap_config():
    """The compile test above has something to compile (the H200 table's Mixtral 512 entry)."""
    assert shipped_swap_gemms()


def served(monkeypatch, table: dict):
    """tokens -> "<path><block_m>" that get_config serves at a small shape (E=8, top-2) whose tuned
    entries are `table`: {token count: (path, block_m)}."""
    entries = {str(t): {"path": path, "block_m": bm, "gate_up": {}, "down": {}} for t, (path, bm) in table.items()}
    monkeypatch.setattr(launch, "_tuned_table", lambda name: {launch.shape_key(8, 64, 32, 2): entries})
    return lambda tokens: (c := launch.get_config(tokens, 8, 64, 32, 2))["path"] + str(c["block_m"])


def test_get_config_takes_a_swap_entry_only_where_experts_fit_its_blocks(monkeypatch):
    """Nearest token count, except that a swap entry of 160-row blocks serves only up to 144 rows an
    expert on average (SWAP_FILL 0.9): beyond, most experts would take two blocks."""
    path = served(monkeypatch, {128: ("sorted", 64), 512: ("swap", 160), 2048: ("sorted", 128)})
    # past 576 tokens the nearest entry that is not a swap one: 128 tokens' up to 1087, then 2048's
    assert [path(t) for t in (100, 384, 576, 577, 1087, 1089)] == [
        "sorted64", "swap160", "swap160", "sorted64", "sorted64", "sorted128"]


def test_get_config_serves_a_swap_entry_where_experts_take_its_blocks(monkeypatch):
    """The rule behind the one above: a swap entry serves where an expert's mean rows take as many
    blocks (`swap_blocks`, at most SWAP_FILL of each) as where it was tuned. An entry of 192-row
    blocks tuned at 640 tokens (160 rows: one block) serves up to 172.8 rows (691 tokens); one of
    160-row blocks tuned at 2048 tokens (512 rows: four blocks) serves 432-576 rows (1729-2304)."""
    path = served(monkeypatch, {640: ("swap", 192), 768: ("sorted", 128), 2048: ("swap", 160)})
    assert [path(t) for t in (300, 691, 692, 1728, 1729, 2304, 2305)] == [
        "swap192", "swap192", "sorted128", "sorted128", "swap160", "swap160", "sorted128"]
    assert [launch.swap_blocks(r, 160) for r in (1, 144, 145, 288, 289, 512)] == [1, 1, 2, 2, 3, 4]
