"""The operations: fit, delete (with estimate and recovery) and repair, each a function over an explicit
`sisa.context.OpContext` that returns the next manifest; only `SisaEnsemble` commits it."""
