"""Pure step functions `step(state, batch, *frozen) -> (state, metrics)`, jitted at the call
site with explicit shardings (see each module's `jit_*` helper)."""
