"""Where `generate` draws latent vectors from (`--prior`).

    normal  the model's own prior, N(0, I)
    gmm     a Gaussian mixture fitted to the aggregate posterior of the
            training split ("ex-post density estimation", Ghosh et al.,
            ICLR 2020): samples land where the training images' codes are,
            not in the holes N(0, I) leaves between them

The mixture is fitted to the posterior means of the training images' first
latent group: the whole z of the flat networks, the top group of `hvae`
(whose lower groups are standardised conditionals of the groups above them
and stay N(0, I)). A class-conditional model gets one mixture per class. The
number of components is chosen among COMPONENTS on the log-likelihood of a
held-out tenth of the codes (full covariances, EM in float64 from a seeded
k-means++ start, so the same codes give the same mixture).

The codes come from a Ray Data job over the training shards (`encode`'s
shard encoder, each shard checked against dataset.json); a one-shard
dataset with no cluster named is encoded in this process. The mixture is
kept in the model's run folder as `prior-gmm-<checkpoint digest>.safetensors`
(weights, means and Cholesky factors; the checkpoint's SHA-256 in its
metadata): every later `generate --prior gmm` of that checkpoint uses that
file, and a set's plan names the file's SHA-256, so exactly-once generation
and resume hold as they do for N(0, I).

Image i of a set draws its component from a uniform keyed by (seed, i) and
its within-component noise from its usual keyed normals:
z_top = mean_c + T * L_c eps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import storage
from .errors import UserError

PRIORS = ("normal", "gmm")
COMPONENTS = (1, 2, 4, 8, 16, 32)  # the mixture sizes tried (per class)
HELD_OUT = 0.1  # of the codes, to choose the size on
MAX_DIMS = 256
MAX_FILE_BYTES = (
    1 << 30
)  # 10 classes x 32 components x 256^2 float64 factors: 168 MB  # full covariances of the first latent group: at most this many numbers
FORMAT = "vae-ray-gmm-1"
EM_ITERATIONS = 100
EM_TOLERANCE = 1e-6  # relative change of the mean log-likelihood that ends EM
_COMPONENT_SALT = 0x5EED  # keys the component draws apart from the latent normals


EXPORTED = "prior-gmm.safetensors"  # the mixture inside an exported model's folder (vae-ray export)


def file_name(checkpoint_sha256: str) -> str:
    return f"prior-gmm-{checkpoint_sha256[:12]}.safetensors"


@dataclass(frozen=True)
class Mixture:
    """One Gaussian mixture per class (one in all for an unconditional model),
    all of the same number of components (classes with fewer have zero-weight ones)."""

    weights: np.ndarray  # (classes, K)
    means: np.ndarray  # (classes, K, D)
    chol: np.ndarray  # (classes, K, D, D), lower-triangular: covariance = L L^T
    checkpoint_sha256: str
    chosen: tuple[int, ...]  # the number of components chosen, per class
    held_out_ll: tuple[float, ...]  # its held-out log-likelihood per code, per class (nats)

    @property
    def dims(self) -> int:
        return int(self.means.shape[-1])

    def sample(self, eps: np.ndarray, uniforms: np.ndarray, classes: np.ndarray | None, temperature: float):
        """z_top for standard normals `eps` (n, D) and uniforms (n,) in (0, 1)."""
        cls = np.zeros(len(eps), dtype=np.int64) if classes is None else np.asarray(classes, dtype=np.int64)
        cumulative = np.cumsum(self.weights, axis=1)
        cumulative /= cumulative[:, -1:]
        comp = np.minimum((cumulative[cls] <= np.asarray(uniforms)[:, None]).sum(1), self.weights.shape[1] - 1)
        noise = np.einsum("nij,nj->ni", self.chol[cls, comp], eps.astype(np.float64))
        return (self.means[cls, comp] + temperature * noise).astype(np.float32)

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        meta = {
            "format": FORMAT,
            "checkpoint_sha256": self.checkpoint_sha256,
            "chosen": list(self.chosen),
            "held_out_ll": [round(v, 6) for v in self.held_out_ll],
        }
        # One metadata entry: safetensors writes several in no fixed order, and
        # the same mixture must be the same bytes.
        tensors = {"weights": self.weights, "means": self.means, "chol": self.chol}
        return save(tensors, metadata={"vae_ray": json.dumps(meta, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Mixture:
        """A stored mixture, believed only once its shapes and values make a mixture."""
        from safetensors.numpy import load

        bad = UserError(f"{where}: not a vae-ray Gaussian-mixture prior (damaged or edited); remove it to refit")
        try:
            arrays, meta = load(data), _metadata(data)
        except Exception:  # noqa: BLE001 - safetensors raises several types for damaged bytes
            raise bad from None
        w, m, chol = (arrays.get(k) for k in ("weights", "means", "chol"))
        try:
            meta = json.loads(meta["vae_ray"])
            chosen = tuple(int(v) for v in meta["chosen"])
            held = tuple(float(v) for v in meta["held_out_ll"])
            sha = str(meta["checkpoint_sha256"])
        except (KeyError, TypeError, ValueError):
            raise bad from None
        if w is None or m is None or chol is None or meta.get("format") != FORMAT:
            raise bad
        c, k = w.shape if w.ndim == 2 else (0, 0)
        if not (
            c
            and k
            and m.shape[:2] == (c, k)
            and m.ndim == 3
            and 1 <= m.shape[2] <= MAX_DIMS
            and chol.shape == (c, k, m.shape[2], m.shape[2])
            and all(np.isfinite(a).all() for a in (w, m, chol))
            and (w >= 0).all()
            and (w.sum(1) > 0).all()
            and len(chosen) == c
        ):
            raise bad
        return cls(w.astype(np.float64), m.astype(np.float64), chol.astype(np.float64), sha, chosen, held)


def _metadata(data: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes (its JSON header's __metadata__)."""
    size = int.from_bytes(data[:8], "little")
    if not 0 < size <= min(len(data) - 8, 1 << 24):
        raise ValueError("no safetensors header")
    meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta


# ---------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------
def fit(codes: np.ndarray, labels: np.ndarray | None, num_classes: int, checkpoint_sha256: str, seed: int = 0):
    """The mixture of the codes (n, D), per class when `num_classes` > 0."""
    groups = [codes] if not num_classes else [codes[labels == c] for c in range(num_classes)]
    fitted = []
    for i, x in enumerate(groups):
        if len(x) < 2:
            raise UserError(f"the training split has {len(x)} image(s) of class {i}: too few to fit a mixture")
        fitted.append(_choose(x.astype(np.float64), np.random.default_rng([seed, i])))
    k = max(len(f[0]) for f in fitted)
    d = codes.shape[1]
    weights, means = np.zeros((len(fitted), k)), np.zeros((len(fitted), k, d))
    chol = np.tile(np.eye(d), (len(fitted), k, 1, 1))
    for i, (w, m, lower, _) in enumerate(fitted):
        weights[i, : len(w)], means[i, : len(w)], chol[i, : len(w)] = w, m, lower
    return Mixture(
        weights, means, chol, checkpoint_sha256, tuple(len(f[0]) for f in fitted), tuple(f[3] for f in fitted)
    )


def _choose(x: np.ndarray, rng: np.random.Generator):
    """The smallest mixture whose held-out log-likelihood is within one
    standard error of the best size's (larger ones fit noise in the
    codes): (weights, means, chol, held-out ll per code)."""
    order = rng.permutation(len(x))
    cut = max(1, int(round(len(x) * HELD_OUT)))
    held, train = x[order[:cut]], x[order[cut:]]
    tried = []  # (weights, means, chol, mean ll, its standard error)
    for k in COMPONENTS:
        if k > 1 and len(train) < k * max(10, 2 * x.shape[1]):  # too few codes per component to trust
            break
        w, m, lower = _em(train, k, rng)
        ll = _log_likelihood(held, w, m, lower)
        tried.append((w, m, lower, float(ll.mean()), float(ll.std() / np.sqrt(len(ll)))))
        if len(tried) > 1 and tried[-1][3] <= tried[-2][3]:
            break  # larger mixtures only fit the training codes closer
    best = max(tried, key=lambda t: t[3])
    w, m, lower, ll, _ = next(t for t in tried if t[3] >= best[3] - best[4])
    return w, m, lower, ll


def _em(x: np.ndarray, k: int, rng: np.random.Generator):
    n, d = x.shape
    reg = 1e-6 + 1e-4 * float(x.var(0).mean())  # keeps every covariance invertible
    resp = np.zeros((n, k))
    resp[np.arange(n), _nearest(x, _kmeanspp(x, k, rng))] = 1.0
    previous = -np.inf
    for _ in range(EM_ITERATIONS):
        w, m, lower = _m_step(x, resp, reg)
        logp = _component_log_probs(x, w, m, lower)
        ll = _logsumexp(logp)
        resp = np.exp(logp - ll[:, None])
        mean = float(ll.mean())
        if mean - previous <= EM_TOLERANCE * abs(mean):
            break
        previous = mean
    return _m_step(x, resp, reg)


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [x[rng.integers(len(x))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centers.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.stack(centers)


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return (
        (((x[:, None, :] - centers[None]) ** 2).sum(-1)).argmin(1)
        if len(x) * len(centers) < 4e6
        else _nearest_blocked(x, centers)
    )


def _nearest_blocked(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return np.concatenate([_nearest(x[i : i + 10_000], centers) for i in range(0, len(x), 10_000)])


def _m_step(x: np.ndarray, resp: np.ndarray, reg: float):
    nk = resp.sum(0) + 1e-12
    w = nk / nk.sum()
    m = resp.T @ x / nk[:, None]
    lower = np.empty((len(nk), x.shape[1], x.shape[1]))
    for j in range(len(nk)):
        diff = x - m[j]
        cov = (resp[:, j, None] * diff).T @ diff / nk[j] + reg * np.eye(x.shape[1])
        lower[j] = np.linalg.cholesky(cov)
    return w, m, lower


def _component_log_probs(x: np.ndarray, w: np.ndarray, m: np.ndarray, lower: np.ndarray) -> np.ndarray:
    d = x.shape[1]
    out = np.empty((len(x), len(w)))
    for j in range(len(w)):
        y = (x - m[j]) @ np.linalg.inv(lower[j]).T
        log_det = np.log(np.diag(lower[j])).sum()
        out[:, j] = np.log(max(w[j], 1e-300)) - 0.5 * (y * y).sum(1) - log_det - 0.5 * d * np.log(2 * np.pi)
    return out


def _logsumexp(a: np.ndarray) -> np.ndarray:
    top = a.max(1)
    return top + np.log(np.exp(a - top[:, None]).sum(1))


def _log_likelihood(x: np.ndarray, w: np.ndarray, m: np.ndarray, lower: np.ndarray) -> np.ndarray:
    return _logsumexp(_component_log_probs(x, w, m, lower))


# ---------------------------------------------------------------------------
# Where the mixture lives, and the Ray job that finds the codes
# ---------------------------------------------------------------------------
def run_folder_of(blob: dict[str, Any]) -> str:
    """The run folder the checkpoint belongs to: where its mixture is kept."""
    from .rundir import RunDir

    path = str(blob["path"])
    if not path.startswith("hf://"):
        run = RunDir(storage.parent_of(path))
        if run.latest() is not None:
            return run.uri
    raise UserError(
        f"{path}: --prior gmm keeps the mixture it fits in the model's run folder, and this checkpoint is not in "
        f"one; generate from the run (or a checkpoint inside it)"
    )


def location(blob: dict[str, Any]) -> str:
    """Where the checkpoint's mixture is kept: in its run folder, or in the
    folder of an exported model (which carries the one its run fitted)."""
    if blob.get("exported"):  # a Hub model's files are in huggingface_hub's cache
        return storage.join(blob["local"] if str(blob["path"]).startswith("hf://") else blob["path"], EXPORTED)
    return storage.join(run_folder_of(blob), file_name(blob["sha256"]))


def not_fitted(blob: dict[str, Any]) -> str:
    if blob.get("exported"):
        return (
            f"{blob['path']}: this exported model carries no Gaussian-mixture prior; run `vae-ray generate "
            f"--prior gmm` on its training run, then export it again (or use --prior normal)"
        )
    return (
        f"{blob['path']}: no mixture fitted yet; `vae-ray generate RUN --prior gmm ...` fits it "
        f"(or vae_ray.generate(..., prior='gmm'))"
    )


def stored(blob: dict[str, Any]) -> tuple[Mixture, bytes] | None:
    """The mixture fitted for this checkpoint and its file's bytes, or None when none was."""
    import os

    import pyarrow.fs as pafs

    path = location(blob)
    fs, where = storage.filesystem(path)
    in_hub_cache = str(blob["path"]).startswith("hf://")  # huggingface_hub's cache links every file to its blob
    if not storage.is_remote(path) and os.path.islink(path) and not in_hub_cache:  # never written as one
        raise UserError(f"{path}: is a link, not the mixture vae-ray writes there; remove it to refit")
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.File or info.size > MAX_FILE_BYTES:
        raise UserError(
            f"{path}: not a Gaussian-mixture prior vae-ray wrote (a folder, or too large); remove it to refit"
        )
    data = storage.read_bytes(path)
    mixture = Mixture.from_bytes(data, path)
    classes = len(blob["dataset"]["classes"]) if blob["config"]["conditional"] else 1
    if mixture.checkpoint_sha256 != blob["sha256"] or mixture.weights.shape[0] != classes:
        raise UserError(f"{path}: fitted for another checkpoint; remove it to refit")
    if mixture.dims != first_group_dims(blob):
        raise UserError(f"{path}: fitted for another latent size; remove it to refit")
    return mixture, data


def ensure(
    blob: dict[str, Any],
    data: str | None,
    address: str | None = None,
    actors: int | None = None,
    gpu: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Mixture, bytes]:
    """The checkpoint's mixture and its file's bytes: the stored one, else fitted now (codes of the
    training split of `data`, or of the dataset the run names) and stored."""
    from .rundir import RunDir

    found = stored(blob)
    if found is not None:
        return found
    if blob.get("exported"):  # a downloaded or shared folder is not written into
        raise UserError(not_fitted(blob))
    dims = first_group_dims(blob)
    data = data or blob["config"].get("data")
    if not data:
        raise UserError(f"{blob['path']}: the checkpoint does not name its dataset; pass --data for --prior gmm")
    codes, labels = training_codes(blob, data, dims, address, actors, gpu, progress)
    mixture = fit(
        codes, labels, len(blob["dataset"]["classes"]) if blob["config"]["conditional"] else 0, blob["sha256"]
    )
    run = RunDir(run_folder_of(blob))
    with run.lock("vae-ray generate --prior gmm"):
        found = stored(blob)  # fitted meanwhile by another generate: that one is kept
        if found is not None:
            return found
        data_bytes = mixture.to_bytes()
        storage.write_bytes(run.path(file_name(blob["sha256"])), data_bytes)
    return mixture, data_bytes


def first_group_dims(blob: dict[str, Any]) -> int:
    """How many numbers of z the mixture models: the first latent group's."""
    from .spec import ModelSpec

    spec = ModelSpec.from_checkpoint(blob["config"], blob["dataset"], blob["path"])
    h, w, c = spec.groups[0]
    dims = h * w * c
    if dims > MAX_DIMS:
        raise UserError(
            f"{blob['path']}: its first latent group holds {dims} numbers; --prior gmm fits full covariances of at "
            f"most {MAX_DIMS}"
        )
    return dims


class CodeReader:
    """A Ray Data actor: the posterior means (first `dims` numbers) and labels of whole training shards."""

    def __init__(self, model_blob: Any, plan: dict, data: str, shape: list[int], dims: int, device: str, threads: int):
        from .encode import ShardEncoder

        self.encoder = ShardEncoder(model_blob, plan, data, shape, "", device, threads)
        self.dims = dims

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"shard": [], "mu": [], "label": [], "error": []}
        for shard in batch["shard"]:
            mu, label, error = b"", b"", ""
            try:
                rows = self.read(int(shard))
                mu, label = rows[0].tobytes(), rows[1].tobytes()
            except UserError as exc:  # handed back as data: the driver ends with it as one line
                error = str(exc)
            out["shard"].append(int(shard))
            out["mu"].append(mu)
            out["label"].append(label)
            out["error"].append(error)
        return {
            "shard": np.array(out["shard"]),
            **{k: np.array(out[k], dtype=object) for k in ("mu", "label", "error")},
        }

    def read(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.encoder.encode(*self.encoder.read_source(shard))
        return np.ascontiguousarray(rows["mu"][:, : self.dims], dtype=np.float32), rows["label"].astype(np.int64)


def training_codes(
    blob: dict[str, Any],
    data: str,
    dims: int,
    address: str | None,
    actors: int | None,
    gpu: bool | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, dims), labels (n,)) of the training split, in shard order."""
    from dataclasses import asdict

    from .cluster import given_address
    from .data import dataset_read_lock, read_meta
    from .encode import BATCH, make_plan

    meta = read_meta(data)
    plan = make_plan(blob, meta, "train", BATCH)
    options = {"plan": asdict(plan), "data": meta["root"], "shape": list(meta["shape"]), "dims": dims}
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    with dataset_read_lock(meta["root"]):
        if given_address(address) is None and actors is None and not gpu and plan.num_shards == 1:
            reader = CodeReader(blob, device="cpu", threads=_threads(), **options)
            parts[0] = reader.read(0)
            if progress:
                progress(plan.num, plan.num)
        else:
            _read_on_ray(blob, plan, options, address, actors, gpu, parts, progress)
    codes = np.concatenate([parts[s][0] for s in range(plan.num_shards)])
    labels = np.concatenate([parts[s][1] for s in range(plan.num_shards)])
    return codes, labels


def _read_on_ray(blob, plan, options, address, actors, gpu, parts, progress) -> None:
    import ray

    from .cluster import connect
    from .errors import UserError as _UserError
    from .sharded import actor_plan, actor_pool

    resources = connect(address, cpus_needed=1, dashboard=False).resources
    use_gpu = bool(resources.get("GPU", 0)) if gpu is None else gpu
    if use_gpu and not resources.get("GPU", 0):
        raise _UserError("--gpu asks for GPU actors but the cluster has no GPUs")
    want, gpus_each = actor_plan(resources, use_gpu, actors)
    ds = ray.data.from_items([{"shard": s} for s in range(plan.num_shards)], override_num_blocks=plan.num_shards)
    results = ds.map_batches(
        CodeReader,
        batch_size=1,
        compute=actor_pool(max(1, min(want, plan.num_shards))),
        fn_constructor_kwargs={
            "model_blob": [ray.put(blob)],
            "device": "cuda" if use_gpu else "cpu",
            "threads": 1,
            **options,
        },
        num_gpus=gpus_each,
        num_cpus=1,
    )
    done = 0
    for row in results.iter_rows():
        if row["error"]:
            raise _UserError(str(row["error"]))
        shard = int(row["shard"])
        mu = np.frombuffer(row["mu"], dtype=np.float32).reshape(-1, options["dims"])
        parts[shard] = (mu, np.frombuffer(row["label"], dtype=np.int64))
        done += len(mu)
        if progress:
            progress(done, plan.num)


def _threads() -> int:
    import os

    return max(1, os.cpu_count() or 1)


def component_uniforms(seed: int, keys: np.ndarray) -> np.ndarray:
    """A uniform in (0, 1) per key, independent of the keys' latent normals."""
    from .keyed_random import keyed_uniforms

    return keyed_uniforms(seed ^ _COMPONENT_SALT, keys)


def draw_latents(
    seed: int,
    keys: np.ndarray,
    dim: int,
    temperature: float,
    scales: np.ndarray | None = None,
    mixture: Mixture | None = None,
    classes: np.ndarray | None = None,
) -> np.ndarray:
    """The latent vectors `generate` decodes for images `keys` (and
    `Model.sample`): keyed normals times T, each number times its latent
    group's factor (`scales`, from `group_scales`), and for --prior gmm the
    top group drawn from the mixture (of each image's class) at T times the
    top group's factor."""
    from .keyed_random import latent_normals

    eps = latent_normals(seed, keys, dim)
    z = eps * np.float32(temperature)
    if scales is not None:
        z *= scales
    if mixture is not None:
        d = mixture.dims
        top = temperature * float(scales[0]) if scales is not None else temperature
        z[:, :d] = mixture.sample(eps[:, :d], component_uniforms(seed, keys), classes, top)
    return z


def group_scales(groups: list[tuple[int, int, int]], text: str | None, where: str = "the model") -> np.ndarray | None:
    """One factor per number of z from --group-temperatures (one per latent
    group, top first; checked against `groups`); None when there are none."""
    from .genplan import canonical_group_temperatures, group_values

    factors = group_values(canonical_group_temperatures(text))
    given = len(str(text).split(",")) if text is not None and str(text).strip() else 0  # all ones count too
    if given and given != len(groups):
        shapes = ", ".join(f"dense {c}" if h == 1 else f"{c}x{h}x{w}" for h, w, c in groups)
        raise UserError(
            f"--group-temperatures gives {given} value(s); {where} has {len(groups)} latent group(s), "
            f"top first: {shapes}"
        )
    if not factors:
        return None
    return np.concatenate(
        [np.full(h * w * c, f, dtype=np.float32) for (h, w, c), f in zip(groups, factors, strict=True)]
    )
