"""Fine-grained expert parallelism (DESIGN.md 4): placement, dispatch/combine over torch.distributed, the wave
schedule, the EP MoE forward (bitwise equal to the single-device MoE with the ordered combine), a launcher and the
EP conformance cases. Import the submodules directly; this package imports nothing heavy on its own."""
