"""``lsr-fast experiment``: every stage of a protocol in one command, then one comparison table.

Stages (each a training run in its own folder under ``out_dir``):
1. target_only (``experiment.target_only``) — trained on labelled target images: the supervised
   reference of mASR (Eq. 9). Off in the paper configs, whose mASR uses the paper's table.
2. source_only — source pre-training: this config with mode source_only, or, with
   ``experiment.source_config``, that file's recipe on top of this config (the paper pre-trains
   with batch 10 on 512x512 patches with BN learnt, then adapts with batch 1 and BN frozen).
3. lsr — initialised from the source-only stage's best weights and adapted with LSR.
4. source_only_continued (``experiment.control``) — the same start, steps and learning rate as
   stage 3 without the LSR terms: what the extra steps alone give.
Then evaluation (each stage's ``best.pt``, selected on data.val, under both protocols of
lsr_fast.eval on the test images: a separate seed for the synthetic scenes, the Cityscapes split
``experiment.test_split`` for real data) and the latent-space analysis.

Running the command again continues where it stopped: a finished stage is skipped (after checking
that its saved config is the one asked for now), an unfinished one resumes from its last.pt, and
nothing an earlier stage wrote is overwritten. Every stage's protocol is checked before the first
one starts; ``plan`` resolves it as JSON without training or reading an image.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .._atomic import atomic_write_text
from ..eval.evaluate import PROTOCOL_TITLES, PROTOCOLS, evaluate, markdown_table, per_class_iou, report
from .build import build_eval_dataset
from .checkpoint import load_for_inference
from .config import (SCHEMA, ConfigError, _list_names, _merge, _nest, check_paths, check_protocol, parse_override, poly_steps,
                     read_yaml, validate)
from .trainer import config_changes, train

RUNS = ("target_only", "source_only", "lsr", "source_only_continued")
ANALYSIS_DONE = "COMPLETE"  # written last into the analysis folder


# ----------------------------------------------------------------------------- stage configs
def stage_names(base: Dict[str, Any]) -> List[str]:
    e = base["experiment"]
    return [r for r in RUNS if (r != "target_only" or e["target_only"]) and (r != "source_only_continued" or e["control"])]


def _source_stage(base: Dict[str, Any], source_overrides: Sequence[str]) -> Dict[str, Any]:
    """This config with mode source_only, then experiment.source_config's keys, then the
    ``--source`` overrides: the pre-training recipe keeps this config's data roots and model."""
    config = copy.deepcopy(base)
    config["mode"] = "source_only"
    path = base["experiment"]["source_config"]
    if path is not None:
        recipe = read_yaml(path)
        if recipe.get("mode", "source_only") != "source_only":
            raise ConfigError(f"experiment.source_config {path} sets mode {recipe['mode']!r}; the pre-training stage is "
                              "source_only")
        if "experiment" in recipe or "out_dir" in recipe:
            raise ConfigError(f"experiment.source_config {path} may not set experiment.* or out_dir (the experiment "
                              "places every stage under its own out_dir)")
        _merge(config, SCHEMA, recipe, "", path)
    for text in source_overrides:
        key, value = parse_override(text)
        _merge(config, SCHEMA, _nest(key, value), "", "--source overrides")
    validate(config, path or "config")
    return config


def stage_configs(base: Dict[str, Any], source_overrides: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """The resolved config of every stage, in order."""
    out_dir = base["out_dir"]
    e = base["experiment"]
    configs = {}
    for run in stage_names(base):
        config = _source_stage(base, source_overrides) if run == "source_only" else copy.deepcopy(base)
        if run in ("target_only", "source_only_continued"):
            config["mode"] = "source_only" if run == "source_only_continued" else "target_only"
        config["name"] = run
        config["out_dir"] = os.path.join(out_dir, run)
        if run in ("lsr", "source_only_continued"):
            config["init"] = os.path.join(out_dir, "source_only", "best.pt")
            if e["adapt_steps"] is not None:
                config["train"]["steps"] = e["adapt_steps"]
            if e["adapt_lr"] is not None:
                config["optim"]["lr"] = e["adapt_lr"]
            validate(config, f"the {run} stage")
        configs[run] = config
    source_init = configs["source_only"]["init"]
    if source_init is not None and os.path.abspath(source_init).startswith(os.path.abspath(out_dir) + os.sep):
        raise ConfigError(f"init of the source_only stage ({source_init}) lies in this experiment's out_dir {out_dir}: "
                          "pre-training cannot start from the adaptation's output")
    return configs


def _derived_init(config: Dict[str, Any], base: Dict[str, Any]) -> bool:
    return config["init"] is not None and config["init"] == os.path.join(base["out_dir"], "source_only", "best.pt")


def check_stages(base: Dict[str, Any], configs: Dict[str, Dict[str, Any]], *, datasets: bool = True) -> None:
    """Everything each stage needs, before the first one starts: files and folders, the protocol
    checks, and (``datasets``) every split list and exclude list against its dataset folder."""
    from .build import check_datasets

    for run, config in configs.items():
        derived = _derived_init(config, base)
        check_paths({**config, "init": None} if derived else config)  # the init file comes from stage 1
        check_protocol(config, f"the {run} stage")
        if datasets:
            check_datasets(config, f"the {run} stage")


# ----------------------------------------------------------------------------- plan
def _count_images(spec: Dict[str, Any]) -> Optional[int]:
    """Images of a dataset entry from its lists alone (no image is read); None when only the
    folder knows."""
    if spec["name"] == "synthetic":
        count = spec["num_images"]
    elif spec["split_list"] is not None and os.path.isfile(spec["split_list"]):
        excluded = spec["exclude_list"] if spec["exclude_list"] is not None and os.path.isfile(spec["exclude_list"]) else None
        count = len(_list_names(spec["split_list"]) - (_list_names(excluded) or set()))
    else:
        return None
    return count if spec["max_images"] is None else min(count, spec["max_images"])


def _plan_stage(run: str, config: Dict[str, Any], base: Dict[str, Any]) -> Dict[str, Any]:
    d, t, o = config["data"], config["train"], config["optim"]

    used = {"source": config["mode"] in ("source_only", "lsr"), "target": config["mode"] in ("lsr", "target_only")}

    def domain(role):
        spec = d[role]
        return {"used": used[role], "name": spec["name"], "root": spec["root"], "split": spec["split"] if spec["name"] == "cityscapes" else None,
                "split_list": spec["split_list"], "exclude_list": spec["exclude_list"],
                "resize": spec["resize"], "crop": d["crop"]}

    val = d["val"]
    lsr = None
    if config["mode"] == "lsr":
        lsr = {k: config["lsr"][k] for k in ("preset", "lambda_cluster", "lambda_perp", "lambda_norm", "lambda_entropy", "alpha",
                                            "momentum", "norm_delta", "label_threshold", "confidence", "clustering_distance",
                                            "norm_form")}
    return {
        "name": run, "mode": config["mode"], "out_dir": config["out_dir"], "steps": t["steps"], "poly_steps": poly_steps(config),
        "lr": o["lr"], "classifier_lr_mult": o["classifier_lr_mult"], "poly_power": o["poly_power"],
        "batch_source": t["batch_source"], "batch_target": t["batch_target"] if config["mode"] == "lsr" else None,
        "source": domain("source"), "target": domain("target"),
        "augmentation": {"flip": d["flip"], "white_point": d["white_point"], "jitter": d["jitter"], "blur_prob": d["blur_prob"]},
        "batchnorm": config["model"]["batchnorm"], "amp": t["amp"], "backbone": config["model"]["backbone"],
        "pretrained": config["model"]["pretrained"], "normalize": d["normalize"], "align_corners": config["model"]["align_corners"],
        "init": ({"stage": "source_only", "file": config["init"]} if _derived_init(config, base)
                 else None if config["init"] is None else {"stage": None, "file": config["init"]}),
        "val": {"name": val["name"], "split": val["split"] if val["name"] == "cityscapes" else f"seed {val['seed']}",
                "split_list": val["split_list"], "exclude_list": val["exclude_list"], "images": _count_images(val),
                "every": t["val_every"], "early_stop_patience": t["early_stop_patience"]},
        "lsr": lsr,
    }


def plan(base: Dict[str, Any], source_overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The resolved protocol of every stage as a JSON-ready dict; checks each stage's protocol
    (no file or folder is required to exist, no image is read)."""
    configs = stage_configs(base, source_overrides)
    for run, config in configs.items():
        check_protocol(config, f"the {run} stage")
    test = _test_spec(base)
    return {
        "stages": [_plan_stage(run, config, base) for run, config in configs.items()],
        "evaluation": {"checkpoints": [f"{run}/best.pt" for run in configs], "protocols": list(PROTOCOLS),
                       "dataset": {"name": test["name"], "split": test["split"] if test["name"] == "cityscapes" else f"seed {test['seed']}",
                                   "images": _count_images(test)},
                       "masr_reference": "target_only stage" if "target_only" in configs else "paper target-only table"},
        "analysis": {"checkpoints": ["source_only/best.pt", "lsr/best.pt"], "out": os.path.join(base["out_dir"], "analysis")},
    }


# ----------------------------------------------------------------------------- running
def _test_spec(base: Dict[str, Any]) -> Dict[str, Any]:
    """Where the final table is measured: held-out synthetic scenes, or a Cityscapes split with
    no list (data.val may hold a selection subset of the training split)."""
    e = base["experiment"]
    test = dict(base["data"]["val"])
    if test["name"] == "synthetic":
        test["seed"], test["num_images"], test["max_images"] = e["test_seed"], e["test_images"], None
    else:
        test["split_list"], test["exclude_list"], test["max_images"] = None, None, e["test_max_images"]
        if test["name"] == "cityscapes":
            test["split"] = e["test_split"]
    return test


def _finished(config: Dict[str, Any]) -> bool:
    """A stage whose summary says it finished (or stopped early) at or past its steps; its saved
    config must match the one asked for now."""
    summary_path = os.path.join(config["out_dir"], "summary.json")
    if not os.path.isfile(summary_path):
        return False
    with open(summary_path, "r", encoding="utf-8") as handle:
        summary = json.load(handle)
    done = summary.get("status") == "early_stop" or (summary.get("status") == "finished" and summary.get("step", -1) >= config["train"]["steps"])
    if not done:
        return False
    last = os.path.join(config["out_dir"], "last.pt")
    if os.path.isfile(last):
        from .checkpoint import load_checkpoint
        from .config import build_config

        changed = config_changes(build_config(load_checkpoint(last)["config"], source=last), config)
        if changed:
            raise ConfigError(f"stage {config['name']} in {config['out_dir']} was finished with another config (differs in "
                              + ", ".join(f"{k}: {was!r} -> {now!r}" for k, was, now in changed[:6])
                              + "); choose another out_dir (nothing is overwritten)")
    return True


def run_experiment(base: Dict[str, Any], *, runs: Optional[List[str]] = None, resume: bool = True,
                   analyze: bool = True, source_overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Run the stages (``runs``: a subset, default all), skipping finished ones and resuming
    unfinished ones (``resume=False`` refuses a folder that holds a run), then evaluate and
    analyse. Returns the results per run (full-resolution protocol), per protocol, the timings
    and where things went."""
    out_dir = base["out_dir"]
    configs = stage_configs(base, source_overrides)
    unknown = [r for r in runs or () if r not in configs]
    if unknown:
        raise ConfigError(f"--runs {' '.join(unknown)}: not a stage of this experiment ({', '.join(configs)})")
    check_stages(base, configs)
    os.makedirs(out_dir, exist_ok=True)
    timings: Dict[str, float] = {}
    for run in runs or list(configs):
        config = configs[run]
        if resume and _finished(config):
            print(f"\n== {run}: finished in {config['out_dir']}, skipped", flush=True)
            continue
        last = os.path.join(config["out_dir"], "last.pt")
        again = resume and os.path.isfile(last)
        print(f"\n== {run}: {config['train']['steps']} steps -> {config['out_dir']}" + (" (resuming)" if again else ""), flush=True)
        start = time.perf_counter()
        summary = train(config, resume="auto" if again else None)
        timings[run] = time.perf_counter() - start
        if summary["status"] == "interrupted":  # a signal stops the whole job, not just this run
            print(f"experiment stopped during {run}; run the same command again to continue", flush=True)
            return {"results": {}, "protocols": {}, "seconds": timings, "summary": None, "figures": None, "interrupted": run}

    summary_md = os.path.join(out_dir, "summary.md")
    if resume and not timings and os.path.isfile(os.path.join(out_dir, "summary.json")):
        print(f"\nevaluation: {summary_md} exists, skipped")
        with open(os.path.join(out_dir, "summary.json"), "r", encoding="utf-8") as handle:
            saved = json.load(handle)
        results, by_protocol = saved["results"], saved["protocols"]
    else:
        results, by_protocol = _evaluate_stages(base, list(configs), timings)
    figures = None
    if analyze and {"source_only", "lsr"} <= set(results):
        figures = os.path.join(out_dir, "analysis")
        if resume and os.path.isfile(os.path.join(figures, ANALYSIS_DONE)):
            print(f"analysis: {figures} is complete, skipped")
        else:
            figures = _analyze(out_dir, _device(base))
    print("Where things went:")
    for run in results:
        print(f"  {run:22s} {os.path.join(out_dir, run)}  (last.pt, best.pt, metrics.jsonl, tb/)")
    print(f"  {'table':22s} {summary_md} (and .json)")
    if figures:
        print(f"  {'plots':22s} {figures}")
    print(f"  TensorBoard: tensorboard --logdir {out_dir}")
    return {"results": results, "protocols": by_protocol, "seconds": timings, "summary": summary_md, "figures": figures}


def _device(base: Dict[str, Any]) -> torch.device:
    return torch.device("cuda" if base["device"] in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def _evaluate_stages(base: Dict[str, Any], runs: List[str], timings: Dict[str, float]):
    out_dir = base["out_dir"]
    test = _test_spec(base)
    device = _device(base)
    test_set = build_eval_dataset({**base, "data": {**base["data"], "val": test}})
    confusions = {}
    for run in runs:
        path = os.path.join(out_dir, run, "best.pt")
        if not os.path.isfile(path):
            continue
        bundle = load_for_inference(path, device)
        confusions[run] = evaluate(bundle.model, test_set, bundle.num_classes, device=device, protocols=PROTOCOLS,
                                   align_corners=bundle.config["model"]["align_corners"])
    by_protocol: Dict[str, Dict[str, Any]] = {}
    for protocol in PROTOCOLS:
        supervised = per_class_iou(confusions["target_only"][protocol]) if "target_only" in confusions else None
        by_protocol[protocol] = {}
        for run, confusion in confusions.items():
            result = report(confusion[protocol], supervised_iou=supervised,
                            supervised_source="target_only run" if supervised is not None else "paper")
            by_protocol[protocol][run] = {**result, "name": run}
    results = by_protocol["full_resolution"]

    where = (f"{len(test_set)} held-out synthetic target images (seed {test['seed']})" if test["name"] == "synthetic"
             else f"{test['name']} {test['split']} ({len(test_set)} images)")
    masr = "the target_only run" if "target_only" in confusions else "the paper's target-only table"
    lines = [f"# LSR main job: {base['name']}", "",
             f"Evaluated on {where}, best checkpoint of each run (selected on data.val); mASR relative to {masr} "
             "(classes present in the test images).", ""]
    for protocol in PROTOCOLS:
        if by_protocol[protocol]:
            lines += [f"## {PROTOCOL_TITLES[protocol]}", "", markdown_table(by_protocol[protocol])]
    lines.append("Runs: " + ", ".join(f"{m} {timings[m]:.0f} s" for m in timings) if timings else "")
    summary_md = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out_dir, "summary.md"), summary_md)
    atomic_write_text(os.path.join(out_dir, "summary.json"),
                      json.dumps({"results": results, "protocols": by_protocol, "seconds": timings, "evaluated_on": where},
                                 indent=2) + "\n")
    print("\n" + summary_md)
    return results, by_protocol


def _analyze(out_dir: str, device: torch.device) -> Optional[str]:
    """The paper's latent-space figures for source-only vs LSR (lsr_fast.analysis)."""
    try:
        from ..analysis import analyze_checkpoints
    except ImportError:
        return None
    figures = os.path.join(out_dir, "analysis")
    analyze_checkpoints(os.path.join(out_dir, "source_only", "best.pt"), os.path.join(out_dir, "lsr", "best.pt"),
                        out=figures, device=str(device))
    # Figures are written one by one: only this marker says a killed analysis need not be redone.
    atomic_write_text(os.path.join(figures, ANALYSIS_DONE), "complete\n")
    return figures
