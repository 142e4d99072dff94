"""The index, checksums and safetensors conversion work without importing torch (controller nodes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_index_and_safetensors_conversion_do_not_import_torch(demo_hf_dir, tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        import ember.ckpt_format as fmt
        from ember.ckpt_format.checksum import verify_all
        index = fmt.convert({str(demo_hf_dir)!r}, {str(tmp_path / "out")!r}, 2)
        verify_all(fmt.open_checkpoint(index.path))
        import ember.cli.checkpoint_commands
        assert "torch" not in sys.modules, "torch was imported"
        print(len(index.tensors))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "21"
