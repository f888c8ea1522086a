"""The zoo's results table: entries paired with ccc_bi and the zero-shot backbone on the same
examples, peers' costs from their records, and seeds side by side."""
import json
import os

import pytest

from benchmarks import zoo_table
from parlai_poly.zoo import recipe, registry


def rows(hits, conversations=20, per_conversation=5):
    """Per-example values: example i of conversation c is a hit (R@1 = 1) where hits(c, i)."""
    out = []
    for c in range(conversations):
        for i in range(per_conversation):
            hit = float(hits(c, i))
            out.append({"conversation": f"c{c}", "R@1/20": hit, "R@5/20": 1.0, "mrr": 0.5 + hit / 2})
    return out


def install(datapath, name, evaluation, record=None):
    """A fake installed entry: the files the table reads (its marker, its values)."""
    target = registry.install_dir(str(datapath), name)
    os.makedirs(target)
    open(os.path.join(target, "model"), "w").close()
    marker = dict({"entry": name, "source": "recipe", "train_seconds": 600, "updates": 100, "epochs": 0.5}, **(record or {}))
    with open(os.path.join(target, recipe.MARKER), "w") as f:
        json.dump(marker, f)
    with open(os.path.join(target, recipe.EVALUATION_ROWS), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in evaluation)


def write_rows(path, values):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in values)


def test_the_table_pairs_entries_with_ccc_bi_the_zero_shot_floor_and_seeds(tmp_path):
    bi = rows(lambda c, i: i < 3)  # 0.6
    poly = rows(lambda c, i: i < 3 or (i == 3 and c % 2 == 0))  # 0.7: never worse, example by example
    zero = rows(lambda c, i: i < 1)  # 0.2
    data, seed2, out = tmp_path / "data", tmp_path / "seed2", tmp_path / "out"
    install(data, "ccc_bi", bi)
    install(data, "ccc_poly16", poly)
    install(data, "minilm", zero, {"train_seconds": 0, "updates": None, "epochs": None})
    install(seed2, "ccc_bi", rows(lambda c, i: i < 2), {"seed": 2})  # 0.4
    install(seed2, "ccc_poly16", rows(lambda c, i: i < 1))  # seed 1: a dependency's build, not seed 2's
    install(data, "ccc_cross", rows(lambda c, i: i < 4))  # evaluated by its build on the sample only
    for name, values in (("ccc_bi", bi), ("ccc_poly16", poly), ("minilm", zero)):
        write_rows(str(out / "sample" / f"{name}.jsonl"), values)  # the sample: cached, not evaluated
    peer = str(tmp_path / "peer" / "st_bi.jsonl")
    write_rows(peer, rows(lambda c, i: i < 2))
    with open(peer[: -len(".jsonl")] + ".trained.json", "w") as f:
        json.dump({"kind": "bi", "updates": 50, "examples_seen": 3200, "minutes": 9.6}, f)

    zoo_table.main(["--datapath", str(data), "--out", str(out), "--sample", "2000", "--peer", f"st_bi={peer}", "--seed-datapath", f"2={seed2}"])

    results = json.load(open(out / "results.json"))
    whole = results["whole CCC test"]
    assert list(whole["summary"]["models"]) == ["ccc_bi", "ccc_poly16", "minilm"]  # ccc_bi first, zero-shot last
    poly_vs_bi = whole["summary"]["models"]["ccc_poly16"]["R@1/20 - ccc_bi"]
    assert poly_vs_bi["mean"] == pytest.approx(0.1) and poly_vs_bi["low"] > 0
    assert whole["above_zero_shot"]["ccc_bi"]["mean"] == pytest.approx(0.4)
    assert "ccc_cross" not in whole["summary"]["models"]
    sample = results["2,000 CCC test examples over all conversations"]
    assert sample["summary"]["models"]["ccc_cross"]["R@1/20 - ccc_bi"]["mean"] == pytest.approx(0.2)  # its build's values
    assert sample["summary"]["models"]["st_bi"]["R@1/20 - ccc_bi"]["mean"] == pytest.approx(-0.2)
    assert "| st_bi |" in sample["table"] and "| 10 | 50 | 3,200 |" in sample["table"]  # the peer's costs
    assert "| ccc_bi |" in whole["table"] and "| 10 | 100 | 51,838 |" in whole["table"]  # 600 s, half an epoch
    seeds = results["seeds (whole CCC test, R@1/20)"]["figures"]
    assert seeds["ccc_bi"]["by_seed"] == {"1": pytest.approx(0.6), "2": pytest.approx(0.4)}
    assert seeds["ccc_bi"]["mean"] == pytest.approx(0.5) and seeds["ccc_bi"]["spread"] == pytest.approx(0.2)
    assert "ccc_poly16" not in seeds  # one seed only: no spread to report
    assert "| ccc_bi | 0.600 | 0.400 | 0.500 | 0.200 |" in open(out / "results.md").read()


def test_seeds_only_rewrites_the_seeds_from_archived_values_and_keeps_the_entry_tables(tmp_path):
    data, seed3, out = tmp_path / "data", tmp_path / "seed3", tmp_path / "out"
    install(data, "ccc_bi", rows(lambda c, i: i < 3))  # 0.6
    write_rows(str(out / "sample" / "ccc_bi.jsonl"), rows(lambda c, i: i < 3))
    zoo_table.main(["--datapath", str(data), "--out", str(out)])
    before = json.load(open(out / "results.json"))
    seed1, seed2 = str(tmp_path / "seed1.jsonl"), str(tmp_path / "seed2.jsonl")
    write_rows(seed1, rows(lambda c, i: i < 3))  # 0.6, the install's values, archived
    write_rows(seed2, rows(lambda c, i: i < 2))  # 0.4
    install(seed3, "ccc_bi", rows(lambda c, i: i < 4), {"seed": 3})  # 0.8
    install(seed3, "ccc_cross", rows(lambda c, i: i < 1), {"seed": 3})  # sample-only: no seed row

    zoo_table.main(["--seeds-only", "--out", str(out), "--seed-values", f"ccc_bi:1={seed1}", "--seed-values", f"ccc_bi:2={seed2}", "--seed-datapath", f"3={seed3}"])

    after = json.load(open(out / "results.json"))
    assert after["whole CCC test"] == before["whole CCC test"] and after["costs"] == before["costs"]
    seeds = after["seeds (whole CCC test, R@1/20)"]["figures"]
    assert list(seeds) == ["ccc_bi"]
    assert seeds["ccc_bi"]["by_seed"] == {"1": pytest.approx(0.6), "2": pytest.approx(0.4), "3": pytest.approx(0.8)}
    assert seeds["ccc_bi"]["spread"] == pytest.approx(0.4)
    markdown = open(out / "results.md").read()
    assert markdown.startswith("### whole CCC test") and "| ccc_bi | 0.600 | 0.400 | 0.800 | 0.600 | 0.400 |" in markdown


def test_an_entry_with_ccc_bi_s_seeds_is_paired_with_it_on_the_seeds_mean(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    files = {
        ("ccc_bi", 1): rows(lambda c, i: i < 3),  # 0.6
        ("ccc_bi", 2): rows(lambda c, i: i < 2),  # 0.4
        ("ccc_poly16", 1): rows(lambda c, i: i < 3 or (i == 3 and c % 2 == 0)),  # 0.7, never below seed 1's ccc_bi
        ("ccc_poly16", 2): rows(lambda c, i: i < 2 or (i == 2 and c % 2 == 1)),  # 0.5, never below seed 2's
    }
    arguments = ["--seeds-only", "--out", str(out)]
    for (name, seed), values in files.items():
        path = str(tmp_path / f"{name}_seed{seed}.jsonl")
        write_rows(path, values)
        arguments += ["--seed-values", f"{name}:{seed}={path}"]

    zoo_table.main(arguments)

    seeds = json.load(open(out / "results.json"))["seeds (whole CCC test, R@1/20)"]["figures"]
    lead = seeds["ccc_poly16"]["mean - ccc_bi"]
    assert lead["mean"] == pytest.approx(0.1) and lead["low"] > 0
    assert "mean - ccc_bi" not in seeds["ccc_bi"]
    assert "| ccc_poly16 | 0.700 | 0.500 | 0.600 | 0.200 | +0.100 [" in open(out / "results.md").read()

    shuffled = str(tmp_path / "ccc_poly16_seed2_shuffled.jsonl")
    write_rows(shuffled, list(reversed(files[("ccc_poly16", 2)])))
    with pytest.raises(SystemExit, match="ccc_poly16 seed 2: its values are not on the same test examples"):
        zoo_table.main(arguments[:-2] + ["--seed-values", f"ccc_poly16:2={shuffled}"])


def test_seeds_only_names_what_it_needs(tmp_path):
    with pytest.raises(SystemExit, match="results.json.*does not exist"):
        zoo_table.main(["--seeds-only", "--out", str(tmp_path)])
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="ccc_bi:2=FILE|ENTRY:SEED=FILE"):
        zoo_table.main(["--seeds-only", "--out", str(tmp_path), "--seed-values", "ccc_bi=seed2.jsonl"])


def test_an_entry_built_elsewhere_joins_the_tables_from_its_kept_values(tmp_path):
    """ccc_bi rebuilt in a fresh datapath; ccc_poly16 from the values and costs kept when it
    was installed: paired with the new ccc_bi, in the table's order, its costs kept."""
    old, new, out = tmp_path / "old", tmp_path / "new", tmp_path / "out"
    poly = rows(lambda c, i: i < 3)  # 0.6
    install(old, "ccc_bi", rows(lambda c, i: i < 2))
    install(old, "ccc_poly16", poly, {"train_seconds": 1800})
    for name, values in (("ccc_bi", rows(lambda c, i: i < 2)), ("ccc_poly16", poly)):
        write_rows(str(out / "sample" / f"{name}.jsonl"), values)
    zoo_table.main(["--datapath", str(old), "--out", str(out)])
    kept = str(tmp_path / "poly16_whole.jsonl")
    write_rows(kept, poly)
    install(new, "ccc_bi", rows(lambda c, i: i < 4))  # 0.8, the rebuild
    os.remove(out / "sample" / "ccc_bi.jsonl")
    write_rows(str(out / "sample" / "ccc_bi.jsonl"), rows(lambda c, i: i < 4))

    zoo_table.main(["--datapath", str(new), "--out", str(out), "--archived", f"ccc_poly16={kept}"])

    results = json.load(open(out / "results.json"))
    whole = results["whole CCC test"]["summary"]["models"]
    assert list(whole) == ["ccc_bi", "ccc_poly16"]
    assert whole["ccc_poly16"]["R@1/20 - ccc_bi"]["mean"] == pytest.approx(-0.2)
    assert results["costs"]["ccc_poly16"]["minutes"] == 30
    with pytest.raises(SystemExit, match=r"--archived ccc_poly64: no sample values at .*ccc_poly64.jsonl"):
        zoo_table.main(["--datapath", str(new), "--out", str(out), "--archived", "ccc_poly64"])
    with pytest.raises(SystemExit, match=r"--archived ccc_bi: it is installed"):
        zoo_table.main(["--datapath", str(new), "--out", str(out), "--archived", "ccc_bi"])
