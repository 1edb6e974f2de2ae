"""peftjax: parameter-efficient fine-tuning as pure functions over Flax param trees."""
import setuptools

setuptools.setup(
    name='peftjax',
    version='0.1.0',
    description='Parameter-efficient fine-tuning methods as pure functions over Flax param trees',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['peftjax', 'peftjax.*', 'configs', 'experiments']),
    package_data={'peftjax.data': ['corpora/*.jsonl.gz']},
    # Floors are the versions the test suite runs against.
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'chex>=0.1.92',
        'ml_collections>=1.1.0',
        'absl-py>=2.5.1',
        'numpy>=2.4',
        'scipy>=1.17',
        'safetensors>=0.8.0',
        'gguf>=0.19.0',
        'tokenizers>=0.23.3',
        'tensorflow-datasets>=4.9.10',  # local builders only: no TensorFlow
        'array_record>=0.8.6',
        'matplotlib>=3.11',
        'tqdm>=4.70',
    ],
    extras_require={
        'test': [
            'pytest>=9.2',
            'pytest-xdist>=3.8',
            # the docs site (`mkdocs build --strict`) and the Colab notebooks, run in a kernel
            'mkdocs>=1.6.1',
            'mkdocs-material>=9.8.2',
            'mkdocstrings[python]>=1.0.8',
            'mkdocstrings-python>=2.0.11',
            'papermill>=2.7.0',
            'ipykernel>=7.4.0',
        ],
        # HF PEFT interoperability tests (tests/test_hf_peft.py); never needed at run time.
        'interop': ['torch==2.13.0', 'transformers>=5.24.0', 'peft>=0.21.2'],
    },
)
