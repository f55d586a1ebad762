"""Class-conditional models: guided MNIST samples (agreement with the offline classifier, classifier FID,
effective classes) over guidance scales, the diffusion classifier on held-out digits, and CIFAR-10's
bits/dim of p(x | y) and p(x) on the same held-out images.

Expects the data split, the offline classifier and its reference statistics of benchmarks/samples.py
(``python benchmarks/samples.py run --dataset mnist --out runs/samples_mnist ...``) and a run of
``sdeflow train --dataset mnist --data-root runs/samples_mnist/data --objective samples --class-conditional
--base-channels 16 --batch-size 64 --steps 2800 --out runs/mn_cond``; for ``cifar``, a run of
``sdeflow train --dataset cifar10 --data-root runs/cifar_likelihood/data --class-conditional --out runs/cifar_cond``
(the 12-minute command) on the split of benchmarks/cifar_budget.py:

    python benchmarks/class_conditional.py guidance 0,0.5,1,2,4 [--runs runs]
    python benchmarks/class_conditional.py classify 100 4 8 3 [--runs runs] [--run mn_cond]  # images, slices/round, rounds, z
    python benchmarks/class_conditional.py cifar [--every-class] [--runs runs]
"""
import json, sys, time
import torch
import sdeflow
from sdeflow.data import get_dataset
from sdeflow.data.transforms import data_range
from sdeflow.experiments.images import sample_images
from sdeflow.likelihood.classifier import evaluate_classifier
from sdeflow.metrics import image_metrics, load_classifier, reference_statistics
from sdeflow.metrics.classifier import classifier_accuracy, predicted_logits
from sdeflow.samplers import SamplerSettings

RUNS = sys.argv[sys.argv.index("--runs") + 1] if "--runs" in sys.argv else "runs"
mode = sys.argv[1]
if mode == "cifar":
    from sdeflow.likelihood.classifier import conditional_bpd

    model, config, step = sdeflow.load_model(f"{RUNS}/cifar_cond")
    images, labels = get_dataset("cifar10").load(f"{RUNS}/cifar_likelihood/data", "test", return_labels=True)
    started = time.perf_counter()
    result = conditional_bpd(model, images, labels, config, batch_size=64, seed=0, every_class="--every-class" in sys.argv)
    print(json.dumps(result | {"step": step, "seconds": time.perf_counter() - started}), flush=True)
    sys.exit(0)
root = f"{RUNS}/samples_mnist/data"
run = f"{RUNS}/{sys.argv[sys.argv.index('--run') + 1] if '--run' in sys.argv else 'mn_cond'}"
model, config, step = sdeflow.load_model(run)
net = load_classifier(f"{RUNS}/samples_mnist/classifier.pt")
dataset = get_dataset("mnist")
reference = reference_statistics(net, dataset.load(root, "train"), cache=f"{RUNS}/samples_mnist/reference-train.npz")
settings = SamplerSettings(method="ancestral", n_steps=50, clip=data_range(config["data"]))
if mode == "guidance":
    rows = []
    for w in [float(v) for v in sys.argv[2].split(",")]:
        started = time.perf_counter()
        images = torch.cat([sample_images(sdeflow.guided(model, k, w), config, 50, settings, seed=k) for k in range(10)])
        requested = torch.arange(10).repeat_interleave(50)  # 50 of each class, each class's draw seeded by it
        agreement = float((predicted_logits(net, images).argmax(1) == requested).double().mean())
        m = image_metrics(net, images, reference, generator=torch.Generator().manual_seed(0))
        row = {"w": w, "agreement": agreement, "fid": m["fid"], "kid": m["kid"], "kid_se": m["kid_se"],
               "confident": m["confident_share"], "effective_classes": m["effective_classes"],
               "seconds": time.perf_counter() - started, "n": 500}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if w == float(sys.argv[2].split(",")[-1]):
            from sdeflow.plotting import save_image_grid
            save_image_grid(torch.cat([images[k * 50:k * 50 + 8] for k in range(10)]),
                            f"{RUNS}/mn_cond_w{w:g}.png", title=f"class-conditional MNIST, one row per class, w={w:g}",
                            ncols=8)
    from sdeflow.plotting import _pyplot
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    ws = [r["w"] for r in rows]
    left.plot(ws, [r["fid"] for r in rows], "o-")
    left.set(xlabel="guidance scale w", ylabel="classifier FID (N = 500)", title="FID")
    right.plot(ws, [100 * r["agreement"] for r in rows], "o-", label="agrees with the requested digit")
    right.plot(ws, [100 * r["confident"] for r in rows], "s--", label="confident")
    right.set(xlabel="guidance scale w", ylabel="% of samples", title="class agreement")
    right.legend(fontsize=8)
    fig.suptitle("class-conditional MNIST, 50 ancestral steps, x̂₀ clipped")
    fig.tight_layout()
    fig.savefig(f"{RUNS}/guidance_curve.png", dpi=120)
elif mode == "classify":
    images, labels = dataset.load(root, "test", return_labels=True)
    n, slices, rounds, z = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    result = evaluate_classifier(model, images[:n], labels[:n], config, n_slices=slices, rounds=rounds, z=z,
                                 batch_size=50)
    offline = classifier_accuracy(net, images[:n], labels[:n])
    print(json.dumps({k: result[k] for k in ("accuracy", "nll", "ece", "seconds_per_image", "evaluations_per_image",
                                             "n_images")}
                     | {"slices": slices, "rounds": rounds, "z": z, "offline_accuracy": offline, "run": run,
                        "step": step}), flush=True)
