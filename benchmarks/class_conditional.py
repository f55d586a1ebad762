"""MNIST class-conditional model: guided samples (agreement with the offline classifier, classifier FID,
effective classes) at several guidance scales, and the diffusion classifier on held-out digits.

Expects the data split, the offline classifier and its reference statistics of benchmarks/samples.py
(``python benchmarks/samples.py run --dataset mnist --out runs/samples_mnist ...``) and a run of
``sdeflow train --dataset mnist --data-root runs/samples_mnist/data --objective samples --class-conditional
--base-channels 16 --batch-size 64 --steps 2800 --out runs/mn_cond``:

    python benchmarks/conditional_mnist.py guidance 0,1,3 [--runs runs]
    python benchmarks/conditional_mnist.py classify 100 32 [--runs runs]    # images, slices per class
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
root, run = f"{RUNS}/samples_mnist/data", f"{RUNS}/mn_cond"
model, config, step = sdeflow.load_model(run)
net = load_classifier(f"{RUNS}/samples_mnist/classifier.pt")
dataset = get_dataset("mnist")
reference = reference_statistics(net, dataset.load(root, "train"), cache=f"{RUNS}/samples_mnist/reference-train.npz")
settings = SamplerSettings(method="ancestral", n_steps=50, clip=data_range(config["data"]))
mode = sys.argv[1]
if mode == "guidance":
    for w in [float(v) for v in sys.argv[2].split(",")]:
        started = time.perf_counter()
        images = torch.cat([sample_images(sdeflow.guided(model, k, w), config, 50, settings, seed=k) for k in range(10)])
        requested = torch.arange(10).repeat_interleave(50)
        agreement = float((predicted_logits(net, images).argmax(1) == requested).double().mean())
        m = image_metrics(net, images, reference, generator=torch.Generator().manual_seed(0))
        row = {"w": w, "agreement": agreement, "fid": m["fid"], "kid": m["kid"], "kid_se": m["kid_se"],
               "confident": m["confident_share"], "effective_classes": m["effective_classes"],
               "seconds": time.perf_counter() - started, "n": 500}
        print(json.dumps(row), flush=True)
        if w == float(sys.argv[2].split(",")[-1]):
            from sdeflow.plotting import save_image_grid
            save_image_grid(torch.cat([images[k * 50:k * 50 + 8] for k in range(10)]),
                            f"{RUNS}/mn_cond_w{w:g}.png", title=f"class-conditional MNIST, one row per class, w={w:g}",
                            ncols=8)
else:
    images, labels = dataset.load(root, "test", return_labels=True)
    n = int(sys.argv[2])
    result = evaluate_classifier(model, images[:n], labels[:n], config, n_slices=int(sys.argv[3]), batch_size=25)
    offline = classifier_accuracy(net, images[:n], labels[:n])
    print(json.dumps({k: result[k] for k in ("accuracy", "nll", "ece", "seconds_per_image", "n_images")}
                     | {"offline_accuracy": offline}), flush=True)
