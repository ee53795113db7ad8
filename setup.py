"""Build the Cython extensions of dragon._core (everything else is plain Python, configured in
pyproject.toml)."""

from glob import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "dragon._core.core",
        ["dragon/_core/core.pyx"],
        include_dirs=["dragon/_core/include"],
        depends=glob("dragon/_core/include/*.h"),  # (the .pxd/.pxi files cythonize tracks itself)
        extra_compile_args=["-O2", "-std=gnu11", "-Wno-unused-function"],
        libraries=["rt", "pthread"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={  # the one place for them (none in the .pyx/.pxi files)
            "auto_pickle": False,  # never pickle raw pointers: each class that pickles has its own __reduce__
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
