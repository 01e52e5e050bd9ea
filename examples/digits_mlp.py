"""Train a small MLP on scikit-learn's digits with torchupdates, in a plain training loop.

Shows the idioms of ``lasagne.updates`` in PyTorch:

1. a rule built once from the parameters (``rmsprop``), with Nesterov momentum added on top
   (``apply_nesterov_momentum``);
2. total-norm clipping of the gradients (``total_norm_constraint``);
3. the update dictionary: ``optimizer.updates(grads)`` proposes new values without writing
   them; a max-norm constraint edits the weights' entries (``norm_constraint``), and
   ``apply_updates`` writes everything;
4. a ``torch.optim.lr_scheduler`` changing the learning rate between epochs.

Run it with ``python examples/digits_mlp.py`` (needs scikit-learn:
``pip install 'torchupdates[demo]'``); ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import torchupdates as updates


def load_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as float rows in [0, 1], split 80/20 into training and validation sets."""
    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = len(x) // 5
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def main(argv: Sequence[str] | None = None) -> float:
    """Train, print progress, and return the final validation accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-norm", type=float, default=2.0, help="per-unit bound on incoming weights")
    parser.add_argument("--clip", type=float, default=1.0, help="bound on the total gradient norm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x_train, y_train, x_val, y_val = load_data(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    params = list(model.parameters())
    weights = [layer.weight for layer in model if isinstance(layer, nn.Linear)]

    # 1. Build the rule once, from the parameters, and add Nesterov momentum to it. Momentum 0.9
    #    makes steps up to ten times larger: use a smaller learning rate than rmsprop alone.
    optimizer = updates.apply_nesterov_momentum(updates.rmsprop(params, learning_rate=args.learning_rate))

    # 4. Any torch scheduler works: it writes param_groups[i]["lr"], which the rule reads each step.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

    shuffle = torch.Generator().manual_seed(args.seed)
    val_accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        total_loss, clipped = 0.0, 0
        order = torch.randperm(len(x_train), generator=shuffle)
        for begin in range(0, len(x_train), args.batch_size):
            batch = order[begin : begin + args.batch_size]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])

            # 2. Clip the gradients' total norm (Lasagne: total_norm_constraint(T.grad(...))).
            grads = updates.get_or_compute_grads(loss, params)
            grads, norm = updates.total_norm_constraint(grads, args.clip, return_norm=True)

            # 3. The update dictionary: parameter (and state tensor) -> proposed new value.
            #    Constrain each output unit's incoming weights, then write everything at once.
            proposal = optimizer.updates(grads)
            for weight in weights:
                proposal[weight] = updates.norm_constraint(proposal[weight], args.max_norm)
            updates.apply_updates(proposal)

            total_loss += loss.item() * len(batch)
            clipped += int(norm.item() > args.clip)
        scheduler.step()
        val_accuracy = accuracy(model, x_val, y_val)
        print(
            f"epoch {epoch:2d}  loss {total_loss / len(x_train):.4f}  clipped steps {clipped:2d}  "
            f"val accuracy {100 * val_accuracy:.2f}%  next lr {scheduler.get_last_lr()[0]:.2e}"
        )
    unit_norms = torch.stack([w.detach().norm(dim=1).max() for w in weights])
    print(f"largest incoming-weight norm of a unit: {unit_norms.max().item():.3f} (bound {args.max_norm})")
    return val_accuracy


if __name__ == "__main__":
    main()
