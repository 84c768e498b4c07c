from setuptools import find_packages, setup

setup(
    name="gpt1-triton",
    version="0.1.0",
    description="GPT-1 pre-training and fine-tuning on fused Triton kernels, trained through DeepSpeed",
    packages=find_packages(include=["gpt1", "gpt1.*", "kernels", "kernels.*", "bench", "bench.*"]),
    package_data={"kernels": ["attention_tuned.json"]},  # the measured attention launch table
    python_requires=">=3.10",
    # torch is pinned by the Makefile before this install (CPU machines take the CPU build on disk);
    # the range here only states what the code needs and never pulls a second torch.
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",
        "deepspeed>=0.16",
        "numpy",
        "tokenizers>=0.19",
        "transformers>=4.40",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest", "pytest-xdist", "ruff"], "peers": ["liger-kernel"]},
    entry_points={"console_scripts": ["gpt1 = gpt1.cli:main"]},
)
