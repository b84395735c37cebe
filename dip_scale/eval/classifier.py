"""Class accuracy of samples of the synthetic set (dip_scale.data.synthetic): does a sample of class c look like c?

A Frechet distance says how far two distributions are apart, not what is wrong with the samples; on the
demo's random-feature Inception it is not even on a known scale. Class accuracy asks what a person asks of
the sample grid: is each sample recognisably its class? It has two parts, each blind to what the other judges:

- texture: a small CNN on a colour-blind view of the image, its pixels projected on their own principal colour
  axis and standardised (sign-symmetric: the logits of the view and of its negative are summed). Stripes,
  checkers, rings, dots, ... decide; colours cannot. Noise in the right colours scores as chance (10 %).
- colours: the image's two dominant colours (2-means in RGB, ordered by luminance), assigned to the class
  whose mean pair over real images is nearest.

A sample counts as its class when both parts say so. Trained once on real synthetic images of one resolution
(a fixed seed, set apart from the demo's train and reference seeds) and checked on held-out real images; the
file records that held-out accuracy, so the score of samples can be read against it.

    classifier = train_classifier(resolution=32)          # ~1 min CPU time; deterministic at fixed threads
    classifier.save("classifier.safetensors")
    scores = class_accuracy(SyntheticClassifier.load("classifier.safetensors"), images, labels)
    scores["class_accuracy"], scores["texture_accuracy"], scores["colour_accuracy"]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dip_scale.data.synthetic import SYNTHETIC_CLASSES, synthetic_image

NUM_CLASSES = len(SYNTHETIC_CLASSES)
TRAIN_SEED = 1001  # the classifier's training images: apart from the demo's train (0) and reference (1) seeds
HELD_OUT_SEED = 1002
SCORES = ("class_accuracy", "texture_accuracy", "colour_accuracy")


# ----------------------------------------------------------------------------------------------------
# The two views
# ----------------------------------------------------------------------------------------------------


def texture_view(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 1, H, W): each image projected on its principal colour axis, zero mean and
    unit variance. The same texture in any two colours gives the same view (up to sign)."""
    x = images.float() / 255.0
    centred = x - x.mean(dim=(2, 3), keepdim=True)  # (B, 3, H, W)
    flat = centred.flatten(2)  # (B, 3, HW)
    cov = flat @ flat.transpose(1, 2) / flat.shape[-1]  # (B, 3, 3)
    axis = torch.linalg.eigh(cov.double()).eigenvectors[..., -1].float()  # (B, 3), the largest eigenvalue's
    view = torch.einsum("bc,bchw->bhw", axis, centred).unsqueeze(1)  # (B, 1, H, W)
    return view / (view.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-3)


def colour_pair(images: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (B, 6) in [0, 1]: the two centres of a 2-means clustering of the pixels in RGB,
    the darker first. Started from the pixels at both ends of the principal colour axis."""
    x = images.float().flatten(2).transpose(1, 2) / 255.0  # (B, HW, 3)
    p = texture_view(images).flatten(1)  # (B, HW)
    idx = torch.stack([p.argmin(1), p.argmax(1)], dim=1)  # (B, 2)
    centres = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, 3))  # (B, 2, 3)
    for _ in range(iterations):
        near = torch.cdist(x, centres).argmin(-1)  # (B, HW)
        member = F.one_hot(near, 2).float()  # (B, HW, 2)
        count = member.sum(1).unsqueeze(-1)  # (B, 2, 1)
        mean = member.transpose(1, 2) @ x / count.clamp(min=1)  # (B, 2, 3)
        centres = torch.where(count > 0, mean, centres)
    luminance = centres @ torch.tensor([0.299, 0.587, 0.114])  # (B, 2)
    order = luminance.argsort(dim=1)  # (B, 2)
    centres = torch.gather(centres, 1, order.unsqueeze(-1).expand(-1, -1, 3))
    return centres.flatten(1)  # (B, 6)


# ----------------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------------


def _texture_net(width: int) -> nn.Sequential:
    w1, w2 = width, 2 * width
    return nn.Sequential(
        nn.Conv2d(1, w1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(w1, w1, 3, stride=2, padding=1), nn.ReLU(),  # H/2
        nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(w2, w2, 3, stride=2, padding=1), nn.ReLU(),  # H/4
        nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w2, NUM_CLASSES),
    )


class SyntheticClassifier(nn.Module):
    """uint8 images (B, 3, R, R) of the synthetic classes -> per part, the predicted class (see module docstring)."""

    def __init__(self, resolution: int, width: int = 32):
        super().__init__()
        self.resolution, self.width = resolution, width
        self.texture = _texture_net(width)
        self.register_buffer("colour_means", torch.zeros(NUM_CLASSES, 6))  # (10, 6): each class's mean pair
        self.held_out: dict = {}  # accuracy on held-out real images, filled by train_classifier

    def texture_logits(self, images: torch.Tensor) -> torch.Tensor:
        view = texture_view(images)
        return self.texture(view) + self.texture(-view)  # (B, 10): the sign of the axis is arbitrary

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(texture class, colour class), each (B,), of uint8 images (B, 3, R, R)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the classifier expects uint8 images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if tuple(images.shape[2:]) != (self.resolution, self.resolution):
            raise ValueError(f"the classifier was trained at {self.resolution} px, got images of "
                             f"{images.shape[2]}x{images.shape[3]}")
        images = images.to(self.colour_means.device)
        texture = self.texture_logits(images).argmax(1)
        colour = torch.cdist(colour_pair(images), self.colour_means).argmin(1)
        return texture, colour

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"resolution": str(self.resolution), "width": str(self.width), "held_out": json.dumps(self.held_out)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SyntheticClassifier:
        """Tensors only (safetensors): loading runs no code from the file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"classifier file {path} does not exist (dip_scale.eval.classifier writes one)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            model = cls(int(meta["resolution"]), int(meta["width"]))
            model.load_state_dict(state)
        except Exception as err:  # not safetensors, or not this classifier's tensors
            raise ValueError(f"classifier file {path} exists but is not a synthetic-class classifier written by "
                             f"dip_scale.eval.classifier ({err})") from err
        model.held_out = json.loads(meta.get("held_out", "{}"))
        return model.eval()


# ----------------------------------------------------------------------------------------------------
# Scores and training
# ----------------------------------------------------------------------------------------------------


def scores(texture: torch.Tensor, colour: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The three accuracies of predictions against the labels the samples were drawn for."""
    labels = labels.to(texture.device)
    t_ok, c_ok = texture == labels, colour == labels
    return {"class_accuracy": (t_ok & c_ok).float().mean().item(), "texture_accuracy": t_ok.float().mean().item(),
            "colour_accuracy": c_ok.float().mean().item()}


def class_accuracy(classifier: SyntheticClassifier, images: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 500) -> dict[str, float]:
    """uint8 images (N, 3, R, R) drawn for `labels` (N,): class, texture and colour accuracy."""
    preds = [classifier.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return scores(torch.cat([p[0] for p in preds]), torch.cat([p[1] for p in preds]), labels)


def real_images(num_images: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images 0..num_images-1 of `seed`: uint8 (N, 3, R, R) and labels (N,)."""
    pairs = [synthetic_image(i, resolution, seed) for i in range(num_images)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([p[1] for p in pairs])


def train_classifier(resolution: int, num_images: int = 12_000, epochs: int = 2, batch_size: int = 64,
                     lr: float = 2e-3, width: int = 32, held_out: int = 1000, seed: int = 0,
                     log=print) -> SyntheticClassifier:
    """Train on `num_images` real images of TRAIN_SEED, check on `held_out` images of HELD_OUT_SEED.
    Deterministic for fixed arguments and thread count (its own generator; the global one is untouched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SyntheticClassifier(resolution, width)
    images, labels = real_images(num_images, resolution, TRAIN_SEED)
    for c in range(NUM_CLASSES):
        model.colour_means[c] = colour_pair(images[labels == c]).mean(0)
    views = texture_view(images)  # (N, 1, R, R)
    optimizer = torch.optim.Adam(model.texture.parameters(), lr=lr)
    steps = epochs * (num_images // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(num_images, generator=g)
        for i in range(0, num_images - batch_size + 1, batch_size):
            batch = order[i:i + batch_size]
            sign = torch.randint(0, 2, (batch_size, 1, 1, 1), generator=g).float() * 2 - 1  # either sign of the axis
            loss = F.cross_entropy(model.texture(views[batch] * sign), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
        log(f"classifier: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}")
    model.eval()
    test_images, test_labels = real_images(held_out, resolution, HELD_OUT_SEED)
    model.held_out = {"num_images": held_out, "seed": HELD_OUT_SEED,
                      **{k: round(v, 4) for k, v in class_accuracy(model, test_images, test_labels).items()}}
    return model
