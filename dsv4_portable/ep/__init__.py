"""Fine-grained expert parallelism (DESIGN.md 4): placement (placement.py), dispatch/combine over torch.distributed
(dispatch.py, transport.py), the wave schedule (waves.py), the EP MoE forward and its provider seam (moe.py,
providers.py: torch-dist everywhere, Ascend MC2 in mc2.py, DeepEP declined), a launcher (launch.py), the model
integration (model.py; run.py is the torchrun entry point) and the EP conformance cases (conformance.py).
Import the submodules directly; this package imports nothing heavy on its own."""
