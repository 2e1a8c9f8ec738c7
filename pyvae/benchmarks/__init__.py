"""pyvae's benchmark suite (``pyvae bench elbo|mlp``, or ``python bench/bench_<family>.py``).

Each family module has ``setup_<op>`` factories, providers ``torch-eager`` / ``torch-compile``
(the plain-PyTorch references of ``pyvae.reference`` or ``torch.nn``) and ``pyvae``, and a ``main``.
Results are appended to ``bench/results/<family>.jsonl``; ``bench/RESULTS.md`` records them.
"""
FAMILIES = ("elbo", "mlp")
