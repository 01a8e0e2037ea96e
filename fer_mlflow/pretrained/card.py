"""The shipped models' cards (docs/model-card.md, docs/model-card-fast.md: `card_page`), written from
their records so that a page and its model cannot disagree:
`python -m fer_mlflow.pretrained.card [variant] > docs/<its page>`, and a test checks that each page
is what this renders."""

from __future__ import annotations

import sys

import numpy as np

from fer_mlflow.pretrained import DEFAULT_VARIANT, VARIANTS, alias, card_page, network_weights, networks, record


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _stored(found: dict) -> str:
    """How the weights are stored, when not float32 (`tools/make_pretrained.py --weights-dtype`)."""
    if found.get("weights_dtype", "float32") == "float32":
        return ""
    return f"; its weights stored as {found['weights_dtype']} and computed in float32, scored as stored"


def _standard_error(accuracy: float, count: int) -> float:
    return float(np.sqrt(accuracy * (1 - accuracy) / count))


def render(variant: str = DEFAULT_VARIANT) -> str:
    """The model card of the shipped `variant`, from its record."""
    found = record(variant)
    training, test, made = found["training"], found["evaluation"], found["made"]
    metrics, classes = test["metrics"], test["classes"]
    per_class = test["per_class"]
    counts = np.array(test["confusion_matrix"])
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    recall = dict(zip(classes, per_class["recall"]))
    weakest = sorted(classes, key=recall.get)[:2]
    confusions = sorted(((normalised[i, j], classes[i], classes[j]) for i in range(len(classes))
                         for j in range(len(classes)) if i != j), reverse=True)[:3]
    choices = found["validation"]["choices"]
    lines = [
        f"# Model card: the shipped model ({variant})",
        "",
        f"<!-- Written by `python -m fer_mlflow.pretrained.card {variant}` from "
        f"fer_mlflow/pretrained/files/{variant}/record.json; tests/test_pretrained.py checks that this page is "
        "what it renders. -->",
        "",
        f"**{found['title']}**: {_networks(found)} of {found['parameters']:,} parameters "
        f"({found['bytes'] / 2**20:.1f} MiB{_stored(found)}), trained by this project with its own {_entry_points(found)}. "
        "It takes a 48x48 grey face (pixels 0..255) and answers seven probabilities: "
        + ", ".join(found["class_names"]) + ".",
        f"It serves {found['settings_described']} by default, with its probabilities divided by a temperature of "
        f"{found['temperature']:.3f} fitted on validation data (`calibration`).",
        "",
        _registered(variant),
        "",
        "## How it was made",
        "",
        f"- Data: `{training['data']}` (data digest `{training['data_digest']}`), FER2013's Training split "
        "cleaned by the `clean` entry point (outliers by mean pixel value, blank images, duplicates, "
        f"leakage into the test splits, conflicting labels removed), {_split_size(found, 'train_images')} "
        f"images to train and {_split_size(found, 'val_images')} held out for validation. "
        "PublicTest was not seen in training or in any choice.",
        *_training_lines(found),
        f"- Made at commit `{made['commit']}` on {made['date']}, with:",
        "",
        *(f"      {command}" for command in made["commands"]),
        "",
        "- Serving choice, on validation data ("
        + "; ".join(f"`{key}`: val_accuracy {c['val_accuracy']:.4f}" for key, c in choices.items())
        + f"): `{found['validation']['chosen']}`"
        + (" (the face alone by purpose: ten views cost ten network passes a face)."
           if len(found["validation"].get("considered", choices)) == 1 else "."),
        f"- SHA-256 of `model.keras`: `{found['sha256']}` (checked each time it is loaded).",
        "",
        f"## Accuracy on PublicTest ({test['images']:,} faces, as served)",
        "",
        f"Accuracy **{metrics['test_accuracy']:.4f}**, macro F1 {metrics['test_f1_macro']:.4f}, weighted F1 "
        f"{metrics['test_f1_weighted']:.4f} (test digest `{test['digest']}`; the standard error of an accuracy on "
        f"{test['images']:,} faces is {100 * _standard_error(metrics['test_accuracy'], test['images']):.1f} points). For scale: always answering the most common class "
        f"({classes[int(np.argmax(counts.sum(axis=1)))]}) scores {counts.sum(axis=1).max() / counts.sum():.4f}.",
        "",
        *_table(["class", "precision", "recall", "F1", "faces"],
                [[c, f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", str(int(s))] for c, p, r, f, s in
                 zip(classes, per_class["precision"], per_class["recall"], per_class["f1"], per_class["support"])]),
        "",
        "Confusion matrix (rows: the true class, share of its faces; columns: the answer):",
        "",
        *_table(["true \\ answer", *classes],
                [[c, *(f"{v:.2f}" for v in row)] for c, row in zip(classes, normalised)]),
        "",
        "## Calibration",
        "",
        f"Expected calibration error (15 bins) on PublicTest: {metrics.get('test_ece', float('nan')):.4f} as served, "
        f"{metrics.get('test_ece_untempered', float('nan')):.4f} before the temperature"
        + (" (fitted on validation data, it did not lower the error on PublicTest)"
           if metrics.get("test_ece", 0) > metrics.get("test_ece_untempered", 1) else "")
        + f": the answer's probability is off its accuracy by {100 * metrics.get('test_ece', 0):.1f} points on "
        "average over the bins, so a threshold on it means what it says, on faces like FER2013's. The "
        "reliability diagram is `figures/reliability.png` of an evaluation run.",
        "",
        "## Where it fails",
        "",
        f"- Weakest classes by recall: {weakest[0]} ({recall[weakest[0]]:.2f}) and {weakest[1]} "
        f"({recall[weakest[1]]:.2f}). Disgust is 1.5% of the training faces.",
        "- Most frequent confusions: " + "; ".join(f"{a} answered as {b} ({v:.0%} of {a})" for v, a, b in confusions)
        + ".",
        "- FER2013's own labels are noisy: human accuracy on it was estimated at 65 +/- 5% when it was "
        "published (Goodfellow et al., 2013), so part of the remaining error is in the labels.",
        "- Photos: the network sees only what the face detector finds and cuts. How many faces the "
        "detectors find in photos, and the accuracy on them, is measured by `benchmarks/photo_path.py` "
        "(BENCHMARKS.md). Faces far from FER2013's (profile, very small, occluded, "
        "non-photographic) are outside what it was trained on.",
        "",
        "## The data and what is unknown about it",
        "",
        "FER2013 was made for the ICML 2013 workshop \"Challenges in Representation Learning\" "
        "(Goodfellow et al., \"Challenges in Representation Learning: A report on three machine learning "
        "contests\", 2013) and published through that challenge on Kaggle: 35,887 48x48 grey faces found by "
        "web image searches for emotion keywords, cropped automatically and labelled with one of seven "
        "expressions. What is known of its terms is that it was released for that challenge and has been "
        "used since for research; no licence for the images themselves is known (they came from the web, and "
        "their rights belong to their owners), and the challenge's rules are not part of the data. This project "
        "ships weights trained on it, not the images. Whether a use beyond research is permitted is unknown: "
        "decide that with your own counsel.",
        "",
        "The data has no labels of age, gender, skin tone or ethnicity, so how the model's accuracy differs "
        "between groups of people is **unmeasured**. Web images of 2013 over-represent some groups; expect "
        "the accuracy above not to hold equally for everyone.",
        "",
        "## Intended and unintended uses",
        "",
        "- Intended: learning and teaching; research and benchmarking on FER2013-like faces; a first model to "
        "compare one's own against; aggregate analysis of posed or acted expressions in media one has the "
        "right to analyse.",
        "- Not intended: inferring what a person feels (a facial expression is not an inner state); any "
        "decision about a person (hiring, grading, insurance, credit, policing, border control, medical or "
        "psychological assessment); surveillance; use on people who have not agreed to it. In the European "
        "Union, emotion recognition in workplaces and schools is prohibited with narrow exceptions "
        "(AI Act, Article 5(1)(f)); elsewhere the Act lists emotion recognition as high-risk (Annex III).",
        "",
    ]
    return "\n".join(lines)


def _networks(found: dict) -> str:
    """What the shipped network is, in a few words: one convolutional network, or an ensemble of them."""
    if not found["training"].get("members"):
        return "a convolutional network"
    weights = network_weights(found)
    averaged = ("with equal weights" if len({round(w, 3) for w in weights}) == 1 else
                "with weights " + ", ".join(f"{w:.3f}" for w in weights))
    return (f"an ensemble of {len(weights)} convolutional networks (their probabilities averaged {averaged}, "
            "one Keras model)")


def _entry_points(found: dict) -> str:
    """The entry points that made the shipped network."""
    return "`train` and `ensemble` entry points" if found["training"].get("members") else "`train` entry point"


def _split_size(found: dict, key: str) -> str:
    """How many faces the shipped network trained on (`train_images`) or was validated on (`val_images`):
    its training run's param (an ensemble's members share one split: its first member's)."""
    params = networks(found)[0]["params"]
    return f"{int(params[key]):,}" if key in params else "?"


def _training_lines(found: dict) -> list[str]:
    """The training of the shipped network (each member's, for an ensemble), as list items."""
    training, made = found["training"], found["made"]
    if not training.get("members"):
        return [f"- Training: {training['epochs']} epochs{_started_from(training)} in "
                f"{training['minutes']:.0f} minutes on a "
                f"{made['machine']}, run `{training['run_id']}` at commit `{training.get('commit', '?')}`; best "
                f"val_accuracy {training['metrics'].get('best_val_accuracy', float('nan')):.4f}."]
    alone = "" if any(_started_from(member) for member in networks(found)) else " on its own"
    lines = [f"- Training: {training['epochs']} epochs in {training['minutes']:.0f} minutes in all, each member "
             f"trained{alone} on the same split; the ensemble (run `{training['run_id']}`) scores "
             f"val_accuracy {training['metrics'].get('val_accuracy', float('nan')):.4f} on the face alone:"]
    for index, member in enumerate(networks(found)):
        within = f" (one of {member['within']}, shipped before)" if member.get("within") else ""
        lines.append(f"    - member {index}, {member.get('title') or member['params'].get('model', '?')}{within}: "
                     f"{member['epochs']} epochs{_started_from(member)} in {member['minutes']:.0f} minutes on a "
                     f"{member.get('machine', made['machine'])}, run `{member['run_id']}` at commit "
                     f"`{member.get('commit', '?')}`; best val_accuracy "
                     f"{member['metrics'].get('best_val_accuracy', float('nan')):.4f}.")
    return lines


def _started_from(network: dict) -> str:
    """For a network fine-tuned from another's weights (``train -P init=...``): the words saying so; the
    epochs and minutes beside them are its own, not those of the network it started from."""
    init = network.get("params", {}).get("init")
    return f" starting from the weights of `{init}`" if init else ""


def _registered(variant: str) -> str:
    """How a user gets the shipped `variant`: its command and alias."""
    if variant == DEFAULT_VARIANT:
        ours, earlier = [], []
        for other in VARIANTS:
            if other != variant:
                (ours if _taught_by_this(other) else earlier).append(f"[the {other} variant]({card_page(other)})")
        return (f"`fer-mlflow pretrained` registers it as `models:/fer-emotion@{alias(variant)}` (and `@champion` when "
                "it is the best on the same test data); `fer-mlflow predict` uses it when no champion is "
                "registered." + (f" Narrower networks distilled from it serve faster: {', '.join(ours)}." if ours else "")
                + (f" Narrower networks distilled from an earlier {variant} variant serve faster: {', '.join(earlier)}."
                   if earlier else ""))
    teacher = record(variant)["training"].get("teacher", {})
    source = (f"[the {DEFAULT_VARIANT} variant]({card_page(DEFAULT_VARIANT)})" if _taught_by_this(variant) else
              f"the {DEFAULT_VARIANT} variant shipped on {teacher['made']} ({teacher['title']}; SHA-256 "
              f"`{teacher['shipped_sha256'][:12]}...`), since replaced by [another]({card_page(DEFAULT_VARIANT)})")
    return (f"`fer-mlflow pretrained --variant {variant}` registers it as `models:/fer-emotion@{alias(variant)}` "
            "(and `@champion` only by the same rules: when there is none yet, or when it scores better on the same "
            f"test data). It is a narrower network distilled from {source}: faster to serve, less accurate.")


def _taught_by_this(variant: str) -> bool:
    """Whether the shipped `variant` was distilled from the default variant shipped now (as far as its
    record tells: one with no recorded shipped teacher is taken to be)."""
    shipped = record(variant)["training"].get("teacher", {}).get("shipped_sha256")
    return not shipped or shipped == record(DEFAULT_VARIANT)["sha256"]


if __name__ == "__main__":
    print(render(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_VARIANT), end="")
