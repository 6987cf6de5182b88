"""The compiled hot path is really there, and its absence fails loudly (SPEC §1)."""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import textwrap

import fastgate
import fastgate.token._verify


def test_verifier_is_a_compiled_extension() -> None:
    path = fastgate.token._verify.__file__ or ""
    assert path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), path
    assert fastgate.Verifier is fastgate.token._verify.Verifier


def test_import_without_extension_says_how_to_build() -> None:
    # Hide the compiled module from the import system in a fresh interpreter.
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastgate.token._verify":
                    raise ImportError("hidden by test")
                return None
        sys.meta_path.insert(0, Block())
        try:
            import fastgate
        except ImportError as exc:
            print(str(exc))
            sys.exit(3)
        sys.exit(0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "pip install" in proc.stdout
    assert "fastgate.token._verify" in proc.stdout


def test_no_pure_python_fallback_module_exists() -> None:
    import importlib.util

    assert importlib.util.find_spec("fastgate.token._verify_py") is None
