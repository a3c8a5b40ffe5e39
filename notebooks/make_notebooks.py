"""Write the four analysis notebooks (outputs stripped) from the cells below: ``python notebooks/make_notebooks.py``.

The notebooks are thin: load, call moegps, show a table and a plot. Edit the cells here, not the .ipynb.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
%matplotlib inline
import numpy as np, pandas as pd, matplotlib.pyplot as plt
from moegps.paths import PROJECT_ROOT, shared_data
from moegps.trace import RoutingTrace
pd.set_option("display.width", 160); pd.set_option("display.precision", 3)

SHIPPED = PROJECT_ROOT / "traces" / "mixtral-tiny" / "mmlu-64"   # the bundled model's MMLU trace (traces/README.md)

def shipped_trace():
    \"\"\"The bundled model's shipped MMLU trace, or None where it is absent.\"\"\"
    return RoutingTrace.read(SHIPPED) if SHIPPED.exists() else None
"""

NB01 = [
    new_markdown_cell("# 1. Routing traces side by side\n\n"
                      "The bundled model's trace (shipped under `traces/`, when present), the real DeepSeek-V2-Lite "
                      "trace (imported from the shared data with `moegps.importers`), and the real Mixtral-8x7B "
                      "expert counts (`olmoe-routing`). For each: how uneven the experts' loads are per layer "
                      "(max/mean), and how much of a token's routing its id alone explains (in-sample hit rate of "
                      "a per-token-id table; `moegps.report.token_id_hit_rate`)."),
    new_code_cell(SETUP),
    new_code_cell("""\
from moegps.importers.deepseek_csv import read_deepseek_csv
from moegps.importers.olmoe_routing import load_expert_counts, LAYER_IDS
from moegps.report import token_id_hit_rate

sources = {}
bundled = shipped_trace()
if bundled is not None:
    sources[bundled.meta.model] = bundled
else:
    print("no trace shipped under traces/ yet: showing the real traces only")
sources["DeepSeek-V2-Lite (real)"] = read_deepseek_csv(shared_data("traces", "deepseek-v2-lite-puffin"), limit=60)
mixtral = load_expert_counts("mistral")            # real Mixtral-8x7B counts, per domain, layers 0/7/15
{k: (v.meta.n_layers, v.meta.n_experts, v.meta.top_k, len(v.requests())) for k, v in sources.items()}"""),
    new_code_cell("""\
rows = []
for name, trace in sources.items():
    loads = trace.loads(by="all")
    for l in range(trace.meta.n_layers):
        sel = trace.layer == l
        rows.append({"source": name, "layer": l, "max_mean": loads.imbalance()[0, l],
                     "hit_rate": token_id_hit_rate(trace.token_id[sel], trace.experts[sel], trace.meta.n_experts)})
imb = mixtral.imbalance()                          # [domain, layer]
for l, layer_id in enumerate(LAYER_IDS):
    rows.append({"source": "Mixtral-8x7B (real counts)", "layer": layer_id, "max_mean": imb[:, l].mean(),
                 "hit_rate": np.nan})
table = pd.DataFrame(rows)
table.groupby("source")[["max_mean", "hit_rate"]].agg(["mean", "max"])"""),
    new_code_cell("""\
panels = [(n, t.loads(by="all").fractions[0], t.meta.layer_ids) for n, t in sources.items()]
panels += [(f"Mixtral-8x7B (real), {d}", mixtral.fractions[i], LAYER_IDS)
           for i, d in enumerate(mixtral.groups["domain"][:2])]
fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
for ax, (name, shares, layer_ids) in zip(np.atleast_1d(axes), panels):
    im = ax.imshow(shares * shares.shape[1], aspect="auto", cmap="magma", vmin=0, vmax=3, interpolation="nearest")
    step = max(1, len(layer_ids) // 6)
    ax.set_yticks(range(0, len(layer_ids), step), [str(x) for x in list(layer_ids)[::step]])
    ax.set_title(name, fontsize=8); ax.set_xlabel("expert"); ax.set_ylabel("MoE layer")
fig.colorbar(im, ax=axes, label="load / mean load"); plt.show()"""),
    new_markdown_cell("Each panel: one row per MoE layer, one column per expert, colour = the expert's share of "
                      "the layer's selections over the even share. The full comparison (per phase, per domain, "
                      "cross-layer affinity) is `python -m moegps.report routing <trace>` (docs/routing_report.md)."),
]

NB02 = [
    new_markdown_cell("# 2. Predictors: accuracy against overhead\n\n"
                      "Fits distribution-only and token-to-expert predictors on half of a trace's requests and "
                      "scores them on the other half (`moegps.predictors.evaluate.evaluate`): load error (total "
                      "variation) for both families, recall@k for token predictors, and the measured CPU latency "
                      "per call beside each predictor's analytical cost."),
    new_code_cell(SETUP),
    new_code_cell("""\
from moegps.predictors import make
from moegps.predictors.evaluate import evaluate
from moegps.workloads import load_trace

trace = shipped_trace() or load_trace("deepseek", limit=60)
names = ["uniform", "global_profile", "phase_profile", "ema", "most_frequent", "token_table", "cross_layer"]
table = evaluate(trace, {n: make(n) for n in names}, test_fraction=0.5, batch_requests=8, progress=False)
cols = ["predictor", "family", "phase", "tv", "recall_at_k", "latency_batch_s", "flops_per_token", "bytes_per_token"]
table[table.phase == "all"][[c for c in cols if c in table.columns]].sort_values("tv")"""),
    new_code_cell("""\
t = table[table.phase == "all"]
colours = {"distribution": "#4c78a8", "token": "#f58518"}
fig, ax = plt.subplots(figsize=(6, 4))
for _, r in t.iterrows():
    ax.scatter(r.latency_batch_s * 1e6, r.tv, color=colours[r.family], s=50)
    ax.annotate(r.predictor, (r.latency_batch_s * 1e6, r.tv), fontsize=7, xytext=(4, 3), textcoords="offset points")
ax.set_xscale("log"); ax.set_xlabel("latency per batch (us, this CPU)"); ax.set_ylabel("load error (TV; lower is better)")
ax.set_title(f"{trace.meta.model}: predictors on the held-out requests", fontsize=9); plt.show()"""),
    new_markdown_cell("Whether a predictor's accuracy pays for its cost end to end is the simulator's question: "
                      "see notebook 4 and `python -m moegps.sweep -m` (docs/sweeps.md)."),
]

NB03 = [
    new_markdown_cell("# 3. Placement: imbalance by algorithm and expert slots\n\n"
                      "Places the experts of each layer on 8 GPUs from the loads of a trace's first half "
                      "(`moegps.placement`), with 0-3 extra slots per GPU for replicas, and measures the max/mean "
                      "GPU load on the second half, beside the lowest imbalance any placement with those slots can "
                      "reach (`balance_bound`)."),
    new_code_cell(SETUP),
    new_code_cell("""\
from moegps.placement.static import contiguous, round_robin
from moegps.placement.balanced import balanced_duplication
from moegps.placement.hierarchical import hierarchical_duplication
from moegps.placement.metrics import placement_imbalance, balance_bound
from moegps.workloads import load_trace, split_by_request

trace = shipped_trace() or load_trace("deepseek", limit=60)
fit, held_out = split_by_request(trace, 0.5, seed=0)
train_loads = fit.loads(by="all").counts[0].astype(float)      # [layer, expert]
test_loads = held_out.loads(by="all").counts[0].astype(float)
G, L, E = 8, trace.meta.n_layers, trace.meta.n_experts
algorithms = {
    "contiguous": lambda s: contiguous(L, E, G, s),
    "round_robin": lambda s: round_robin(L, E, G, s),
    "balanced": lambda s: balanced_duplication(train_loads, G, s),
    "hierarchical (2 nodes)": lambda s: hierarchical_duplication(train_loads, G, s, n_nodes=2, n_groups=2 if E % 2 == 0 else 1),
}
rows = []
for extra in range(4):
    slots = -(-E // G) + extra
    for name, place in algorithms.items():
        rows.append({"algorithm": name, "extra_slots": extra,
                     "imbalance": placement_imbalance(place(slots), test_loads).mean(),
                     "bound": balance_bound(test_loads, G, slots).mean()})
table = pd.DataFrame(rows)
table.pivot(index="algorithm", columns="extra_slots", values="imbalance")"""),
    new_code_cell("""\
fig, ax = plt.subplots(figsize=(6.5, 3.8))
# algorithms whose curves coincide (e.g. contiguous and round_robin when each GPU holds one expert)
# share one line and one legend entry, so that no line hides another
curves = {}
for name, g in table.groupby("algorithm", sort=False):
    curves.setdefault(tuple(g.imbalance.round(9)), (g.extra_slots, []))[1].append(name)
for (xs, names), style in zip(curves.values(), ["o-", "s--", "^-.", "D:"]):
    ax.plot(xs, table[table.algorithm == names[0]].imbalance, style, label=" = ".join(names))
b = table.groupby("extra_slots").bound.first()
ax.plot(b.index, b.values, "k--", label="bound (any placement)")
ax.set_xlabel("extra expert slots per GPU"); ax.set_ylabel("max / mean GPU load (held-out half)")
ax.set_xticks(range(4)); ax.legend(fontsize=8)
ax.set_title(f"{trace.meta.model}: {E} experts on {G} GPUs, mean over {L} layers", fontsize=9); plt.show()"""),
    new_markdown_cell("The full study (more algorithms, per-request and per-phase loads, the MILP optimum) is "
                      "`python -m moegps.placement` (docs/placement.md); the effect on end-to-end time is in "
                      "notebook 4 and the sweep report's placement table."),
]

NB04 = [
    new_markdown_cell("# 4. Simulated against measured speedup\n\n"
                      "A small sweep in this process (`moegps.sweep.compose_config` + `run_one`, the same code "
                      "`python -m moegps.sweep -m` runs per point): predictors x placements x link bandwidths "
                      "in the simulator, speedups over the static baseline computed at read time "
                      "(`moegps.report.load_results`). Then any executor rows shipped with the project "
                      "(`results/`, backend `exec`) are paired with the simulated ones "
                      "(`moegps.report.sim_vs_measured`)."),
    new_code_cell(SETUP),
    new_code_cell("""\
import tempfile
from pathlib import Path
from moegps.sweep import compose_config, run_one
from moegps.report import load_results, sim_vs_measured, plot_end_to_end

store = Path(tempfile.mkdtemp()) / "sweep"
# the bundled model's trace, costed at Mixtral-8x7B's expert shape (else the DeepSeek trace, its own shape)
trace, shape = (str(SHIPPED), "mixtral-8x7b") if SHIPPED.exists() else ("deepseek", "null")
for predictor in ("global_profile", "ema", "token_table"):
    for placement in ("contiguous", "balanced"):
        for link in (450, 64):
            run_one(compose_config([f"trace={trace}", f"shape={shape}", "limit=40", f"predictor={predictor}", f"placement={placement}",
                                    f"system.link_gbps={link}", "batch_size=16", f"out={store}"]))
df = load_results(store)
runs = df[df["config.role"] == "run"]
runs.pivot_table(index=["config.predictor.name", "config.placement.name"], columns="config.system.link_gbps",
                 values="speedup")"""),
    new_code_cell("""\
plot_end_to_end(df, store / "end_to_end", "simulated speedup over the static baseline")
from IPython.display import Image
Image(str(store / "end_to_end.png"))"""),
    new_code_cell("""\
from moegps.results import read_results
shipped = (PROJECT_ROOT / "results").is_dir() and any((PROJECT_ROOT / "results").rglob("*.parquet"))
measured = read_results(PROJECT_ROOT / "results") if shipped else pd.DataFrame()  # side tables skipped
if len(measured) and (measured.get("backend") == "exec").any():
    both = load_results(store)
    both = pd.concat([both, measured.assign(**{"config.role": "run", "trace_name": measured.get("config.trace", "")})],
                     ignore_index=True)
    pairs = sim_vs_measured(both)
    print(f"{(measured.backend == 'exec').sum()} executor rows shipped; {len(pairs)} pair with this sweep's configs")
    display(pairs)
else:
    print("No executor results are shipped with the project (results/ holds no backend='exec' rows): "
          "this notebook shows simulated speedups only. Measured rows come from `python -m moegps.executor` "
          "or `python -m moegps.sweep -m backend=exec` on a GPU; `python -m moegps.report results <store>` "
          "then adds the simulated-vs-measured table and plot.")"""),
    new_markdown_cell("## Serving, call by call\n\n"
                      "A serving run of the engine on one H100 (`python -m moegps.engine.serve --out RUN.csv`, the "
                      "64-expert shape, random bf16 weights, 10 / 40 / 80 requests a second; "
                      "`benchmarks/engine/serve-calls-h100-2026-12-05-y/`) recorded every model call. The serving "
                      "simulator's cost model costs the same calls (`moegps.simulator.serving.compare_calls`), with the "
                      "shipped H100 profile and with its weight rate and per-layer cost fitted to the 40 req/s run's calls "
                      "(`fit_calls`); the table and plot are the 10 and 80 req/s runs' calls, held out."),
    new_code_cell("""\
from moegps.shapes import from_name
from moegps.simulator.serving import call_seconds, compare_calls, fit_calls, read_call_records
from moegps.simulator.system import load_system

RUN = PROJECT_ROOT / "benchmarks" / "engine" / "serve-calls-h100-2026-12-05-y" / "pinned" / "measured-calls.csv.gz"
records = read_call_records(RUN)
shape, system = from_name("deepseek-v2-lite"), load_system("h100_8gpu").replace(n_gpus=1, gpus_per_node=1)
# that run's free rows decoded token 0 (the engine's way before session aa): cost them so
fitted = fit_calls([r for r in records if float(r["rate"]) == 40], shape, system, eager_layer_s=1e-3, free_rows="token0")
held = [r for r in records if float(r["rate"]) != 40]
by_class = {label: pd.DataFrame(compare_calls(held, lambda c, spec=spec: call_seconds(c, shape, spec, 1e-3, free_rows="token0"))).set_index("class")
            for label, spec in (("shipped profile", system), ("fitted on 40 req/s", fitted))}
table = by_class["shipped profile"][["calls", "measured_s"]].assign(
    **{f"measured / modelled, {label}": t["measured_s"] / t["modelled_s"] for label, t in by_class.items()})
print(f"fitted: {fitted.hbm_bandwidth / 1e12:.2f} TB/s, {fitted.block_overhead * 1e6:.1f} us a layer a call")
table.drop(index="between calls")"""),
    new_code_cell("""\
ratios = table.drop(index="between calls").filter(like="measured / modelled")
fig, ax = plt.subplots(figsize=(10, 5))
ratios.plot.barh(ax=ax)
ax.axvline(1.0, color="k", lw=0.8)
ax.set_xlim(0.5, 1.6); ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
ax.set_xlabel("measured / modelled time, summed over the class's held-out calls")
ax.invert_yaxis(); fig.tight_layout()
fig.savefig(store / "serving_calls.png", dpi=110)  # an earlier cell's plots left matplotlib on Agg
Image(str(store / "serving_calls.png"))"""),
    new_markdown_cell("## The expert part on recorded routing\n\n"
                      "The simulator's expert roofline is calibrated on whole kernel calls with evenly spread rows. "
                      "Two H100 runs of session ag (`benchmarks/kernels/logs/h100-2026-12-06-ag/`, "
                      "`benchmarks/simulator/h100-2026-12-06-ag/`) measured it where a real router and expert "
                      "parallelism put it:\n"
                      "- whole calls on DeepSeek-V2-Lite's recorded prefill routing (`python -m moegps.kernels.bench "
                      "--routing-trace ...`: the busiest expert 1.6-5.7x the mean rows), and\n"
                      "- one GPU's share of each step of an 8-GPU replay of the same prompts (`python -m "
                      "moegps.simulator ... expert_time=kernels` writes `expert_shares.csv`: each share's rows per "
                      "expert and its time), at batch 64 and 16.\n\n"
                      "Below: the shipped `h100_8gpu` profile against each, and the same roofline fitted on the "
                      "batch-64 shares, scored on the batch-16 ones (out of sample)."),
    new_code_cell("""\
from moegps.simulator.calibrate import cases_from_kernel_bench, error_table, fit

AG_KERNELS = PROJECT_ROOT / "benchmarks" / "kernels" / "logs" / "h100-2026-12-06-ag"
AG_SIM = PROJECT_ROOT / "benchmarks" / "simulator" / "h100-2026-12-06-ag"
measured_sets = {"whole calls, recorded routing": cases_from_kernel_bench(AG_KERNELS / "call1-trace.csv"),
                 "one GPU's shares, batch 64 (fit)": cases_from_kernel_bench(AG_SIM / "call6-expert-shares-b64.csv"),
                 "one GPU's shares, batch 16 (held out)": cases_from_kernel_bench(AG_SIM / "call6-expert-shares-b16.csv")}
deepseek, shipped = from_name("deepseek-v2-lite"), load_system("h100_8gpu")
refit, _ = fit(measured_sets["one GPU's shares, batch 64 (fit)"], deepseek, shipped,
               ("hbm_bandwidth", "matmul_flops", "expert_launch", "layer_overhead", "roofline_p"))
tables = {(name, label): error_table(cases, deepseek, spec)
          for name, cases in measured_sets.items() for label, spec in (("shipped", shipped), ("fitted on shares", refit))}
pd.DataFrame({key: {"cases": len(t), "mean |error| %": t.abs_error_pct.mean(), "max |error| %": t.abs_error_pct.max(),
                    "simulated / measured (median)": t.ratio.median()} for key, t in tables.items()}).T"""),
    new_code_cell("""\
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True, sharey=True)
lim = (40, 4000)
for ax, label in zip(axes, ("shipped", "fitted on shares")):
    for name in measured_sets:
        t = tables[(name, label)]
        ax.scatter(t.measured_ms * 1e3, t.simulated_ms * 1e3, s=6, alpha=0.4, label=name)
    ax.plot(lim, lim, color="k", lw=0.8)
    ax.set_xscale("log"); ax.set_yscale("log"); ax.set_xlim(*lim); ax.set_ylim(*lim); ax.grid(alpha=0.3)
    ax.set_title(f"h100_8gpu expert roofline, {label}", fontsize=10); ax.set_xlabel("measured on one H100 (us)")
axes[0].set_ylabel("simulated (us)"); axes[0].legend(fontsize=8, markerscale=3)
fig.tight_layout()
fig.savefig(store / "expert_part_recorded.png", dpi=110)  # matplotlib is on Agg here (see above)
Image(str(store / "expert_part_recorded.png"))"""),
]


def write(name: str, cells: list) -> Path:
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"},
                                             "language_info": {"name": "python"}})
    path = HERE / name
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    for name, cells in (("01_routing_traces.ipynb", NB01), ("02_predictors.ipynb", NB02),
                        ("03_placement.ipynb", NB03), ("04_simulated_vs_measured.ipynb", NB04)):
        print(write(name, cells))
