"""``python -m fmnist_sweep predict MODEL_URI IMAGES``: the class and its probability for each
image, from a classifier a run logged (``runs:/RUN_ID``, ``models:/m-ID``) or registered
(``models:/fmnist-STUDY/N``). Images: a PNG/JPEG/BMP/GIF/WebP file, a folder of them, or an
IDX file (gzipped or not) of 28x28 images, as Fashion-MNIST ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .models import CLASSES

PICTURES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SIDE = 28


def read_images(path: str) -> tuple[list[str], np.ndarray]:
    """(names, uint8 images (N, 28, 28)) from a picture, a folder of pictures or an IDX file."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in PICTURES)
        if not files:
            raise UserError(f"{p}: no image in this folder (looked for {', '.join(PICTURES)} files)")
        return [f.name for f in files], np.stack([picture(f) for f in files])
    if not p.is_file():
        raise UserError(f"{p}: no such file or folder")
    if p.suffix.lower() in PICTURES:
        return [p.name], picture(p)[None]
    from .data import read_idx

    images = read_idx(p, fix="Fix: give a PNG or JPEG file, a folder of them, or an IDX file of images.")
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise UserError(f"{p}: an IDX file of shape {images.shape}, not of 28x28 images (N, 28, 28)")
    return [f"{p.name}[{i}]" for i in range(len(images))], images


def picture(path: Path) -> np.ndarray:
    """One picture as Fashion-MNIST draws it: grayscale (ITU-R 601 luma of RGB), a light garment
    on black (a picture whose border is mostly light is inverted), fitted into 28x28 with its
    aspect ratio kept and the rest black."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            gray = ImageOps.exif_transpose(im).convert("L")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({str(e).splitlines()[0]})") from None
    pixels = np.asarray(gray)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127:
        gray = ImageOps.invert(gray)
    if gray.size != (SIDE, SIDE):
        gray = ImageOps.pad(gray, (SIDE, SIDE), method=Image.Resampling.LANCZOS, color=0)
    return np.asarray(gray, dtype=np.uint8)


def load(uri: str, tracking_uri: str):
    """The pyfunc model at ``uri`` (``runs:/ID`` alone means the run's logged model)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .served import using_tracking_uri

    if uri.startswith("runs:/") and "/" not in uri.removeprefix("runs:/").strip("/"):
        uri = uri.rstrip("/") + "/model"
    with using_tracking_uri(tracking_uri):
        try:
            return mlflow.pyfunc.load_model(uri)
        except (MlflowException, OSError) as e:
            raise UserError(f"{uri}: cannot load this model ({str(e).splitlines()[0][:300]}). Fix: give a "
                            "models:/NAME/VERSION, models:/m-ID or runs:/RUN_ID URI from this tracking store "
                            "(tracking=... selects another).") from None


def predict(uri: str, images: str, tracking_uri: str) -> str:
    """One line per image: its name, the predicted class and that class's probability."""
    names, pixels = read_images(images)
    model = load(uri, tracking_uri)
    outputs = model.metadata.get_output_schema()
    if outputs is None or tuple(outputs.inputs[0].shape) != (-1, len(CLASSES)):
        raise UserError(f"{uri} is not a Fashion-MNIST classifier logged by fmnist_sweep (it outputs "
                        f"{outputs.inputs[0].shape if outputs else 'no declared shape'}, not class probabilities)")
    probs = np.asarray(model.predict(np.array(pixels)))  # a writable copy, as torch wants
    width = max(len(n) for n in names)
    return "".join(f"{n:<{width}}  {CLASSES[k]:<11}  {p[k]:.3f}\n"
                   for n, p, k in zip(names, probs, probs.argmax(1)))
