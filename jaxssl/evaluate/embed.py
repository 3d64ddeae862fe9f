"""Pictures of a representation: a 2-D map of features coloured by class, and a retrieval grid.

- `project_2d`: UMAP (umap-learn, `pip install -e '.[umap]'`) with the cosine metric where it
  is installed, PCA of the L2-normalised features otherwise (or when asked); says which.
- `nearest`: each query's k nearest bank rows by cosine similarity, exactly (a chunked
  float32 product over the bank, so a bank of millions never needs a [q, N] float64 matrix).
- `plot_map`, `plot_retrieval`: the PNGs, of a fixed pixel size (MAP_SIZE; `retrieval_size`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["project_2d", "nearest", "plot_map", "plot_retrieval", "retrieval_size", "MAP_SIZE",
           "DPI"]

DPI = 100
MAP_SIZE = (1000, 800)  # width, height in pixels
_CELL = 1.3  # inches per image of the retrieval grid


def _normalise(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def project_2d(features, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(xy [n, 2] float64, "umap" or "pca") for features [n, F].

    method "auto": UMAP where umap-learn is installed, PCA otherwise; "umap" requires it
    (ImportError, saying how to install it, otherwise); "pca": principal components of the
    L2-normalised, centred features (signs fixed so each component's largest loading is
    positive), computed in float64.
    """
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"unknown method {method!r}; choose auto, umap or pca")
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 3:
        raise ValueError(f"need features [n >= 3, F]; got shape {features.shape}")
    if method in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise ImportError("eval.embed_method 'umap' needs umap-learn: "
                                  "pip install -e '.[umap]' (or use 'pca')") from None
        else:
            reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed,
                                n_neighbors=min(15, features.shape[0] - 1))
            return np.asarray(reducer.fit_transform(_normalise(features)), np.float64), "umap"
    x = _normalise(features).astype(np.float64)
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    components = vt[:2]
    signs = np.sign(components[np.arange(len(components)),
                               np.argmax(np.abs(components), axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    xy = x @ components.T
    if xy.shape[1] < 2:  # one-dimensional features
        xy = np.concatenate([xy, np.zeros((len(xy), 2 - xy.shape[1]))], axis=1)
    return xy, "pca"


def nearest(queries, bank, k: int, *, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(indices [q, k] int64, similarities [q, k] float32): for each query, the k bank rows of
    highest cosine similarity, most similar first (ties: the lower row first).

    bank [N, F] may be a memory map: it is read in chunks of `chunk` rows.
    """
    q = _normalise(queries)
    n = bank.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= {n} (the bank's rows); got k={k}")
    best_sim = np.full((len(q), 0), -np.inf, np.float32)
    best_idx = np.zeros((len(q), 0), np.int64)
    for start in range(0, n, chunk):
        block = _normalise(bank[start:start + chunk])
        sims = q @ block.T  # [q, c]
        idx = np.broadcast_to(np.arange(start, start + len(block)), sims.shape)
        sims = np.concatenate([best_sim, sims], axis=1)
        idx = np.concatenate([best_idx, idx], axis=1)
        # Highest similarity first, then the lower row: a stable order for equal similarities.
        order = np.lexsort((idx, -sims), axis=1)[:, :k]
        best_sim = np.take_along_axis(sims, order, axis=1)
        best_idx = np.take_along_axis(idx, order, axis=1)
    return best_idx, best_sim


def _class_name(names: Sequence[str] | None, label: int, width: int = 0) -> str:
    """The class's name (its number where there are no names), cut to `width` characters."""
    name = str(names[label]) if names is not None and label < len(names) else str(label)
    return name if not width or len(name) <= width else name[:width - 1] + "~"


def plot_map(xy, labels, class_names: Sequence[str] | None, path: str, *, title: str) -> str:
    """A scatter of xy [n, 2] coloured by class with a legend of class names; PNG of MAP_SIZE
    pixels written to the local `path`."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = np.asarray(labels)
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20
                        else "gist_ncar")
    fig = plt.figure(figsize=(MAP_SIZE[0] / DPI, MAP_SIZE[1] / DPI), dpi=DPI)
    ax = fig.add_axes((0.05, 0.05, 0.72, 0.88))
    for i, c in enumerate(classes):
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=max(2.0, min(16.0, 8000 / len(labels))), alpha=0.7, color=cmap(i % cmap.N),
                   label=_class_name(class_names, int(c)), linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(classes) <= 40:
        fig.legend(loc="center right", bbox_to_anchor=(0.995, 0.5), fontsize=8, markerscale=3,
                   frameon=False)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def retrieval_size(queries: int, neighbours: int) -> tuple[int, int]:
    """The retrieval grid's (width, height) in pixels."""
    return round((neighbours + 1) * _CELL * DPI), round((queries * _CELL + 0.4) * DPI)


def plot_retrieval(query_images, query_labels, neighbour_images, neighbour_labels, similarities,
                   class_names: Sequence[str] | None, path: str, *, title: str) -> str:
    """One row per query: the query image (framed in black, its class in bold), then its neighbours with their label and cosine
    similarity, a neighbour of another class framed in red and its label marked with a cross.

    query_images uint8 [q, S, S, 3]; neighbour_images uint8 [q, k, S, S, 3]; labels and
    similarities [q] and [q, k]. PNG of `retrieval_size(q, k)` pixels at the local `path`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    q, k = np.asarray(neighbour_labels).shape
    width, height = retrieval_size(q, k)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.suptitle(title, fontsize=9, y=1 - 0.12 / (height / DPI))
    top = 1 - 0.4 / (height / DPI)
    for r in range(q):
        for c in range(k + 1):
            ax = fig.add_axes((c / (k + 1) + 0.005, top * (1 - (r + 1) / q) + 0.005,
                               1 / (k + 1) - 0.01, top / q - 0.035 * 6 / max(q, 6)))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.imshow(query_images[r])
                ax.set_title(_class_name(class_names, int(query_labels[r]), 18), fontsize=7,
                             fontweight="bold")
                colour, lw = "black", 2.5
            else:
                label = int(neighbour_labels[r][c - 1])
                same = label == int(query_labels[r])
                ax.imshow(neighbour_images[r][c - 1])
                ax.set_title(f"{'' if same else 'x '}{_class_name(class_names, label, 14)} "
                             f"{float(similarities[r][c - 1]):.2f}", fontsize=7,
                             color="black" if same else "red")
                colour, lw = ("green", 1.5) if same else ("red", 3.0)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(lw)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
