"""Build the Cython extensions of dragon._core (everything else is plain Python, configured in pyproject.toml)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "dragon._core.core",
        ["dragon/_core/core.pyx"],
        include_dirs=["dragon/_core/include"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wno-unused-function"],
        libraries=["rt", "pthread"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
