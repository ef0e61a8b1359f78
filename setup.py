"""Installs the efficient-sequence-architectures research codebase.

    pip install -e '.[test]'     # CPU: train the tiny models and run the tests
    pip install -e '.[gpu]'      # NVIDIA GPU (CUDA 13 wheels of jax)
    pip install -e '.[tpu]'      # Cloud TPU (libtpu)
    pip install -e '.[tokenizers]'  # SentencePiece tokenizers (config.tokenizer=<model file>)
"""
import setuptools

_CORE = [
    'absl-py>=2.1',
    'numpy>=1.26',
    'jax>=0.10.2',
    'flax>=0.12.8',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.8',
    'ml_collections>=1.0',
    'tensorflow-datasets>=4.9.10',
    'array-record>=0.8.1',
    'importlib_resources>=6.0',  # tensorflow-datasets needs it for builders defined outside tfds
    'grain>=0.2.18',
]

setuptools.setup(
    name='seqarch',
    version='0.1.0',
    description='Efficient sequence architectures in JAX/Flax NNX, one trainer, sharded over device meshes.',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['architectures*', 'layers*', 'trainers*', 'experiments*']),
    install_requires=_CORE,
    extras_require={
        # jax[tpu] brings libtpu, with which the tests compile every family for real TPU topologies.
        'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'matplotlib>=3.8', 'nbclient>=0.10', 'nbformat>=5.10',
                 'ipykernel>=6.29', 'jax[tpu]>=0.10.2', 'sentencepiece>=0.2'],
        # config.tokenizer=<a SentencePiece model file>, experiments.train_tokenizer, sample_recurrentgemma.
        'tokenizers': ['sentencepiece>=0.2'],
        'plots': ['matplotlib>=3.8'],
        'gpu': ['jax[cuda13]>=0.10.2'],
        'tpu': ['jax[tpu]>=0.10.2'],
        'tensorboard': ['tensorboardX>=2.6'],
    },
)
