"""The training machinery: the loop (``trainer``), checkpoints and the run directory (``checkpoint``,
``rundir``), precomputed reference log-probs (``reference``), multi-process set-up (``distributed``) and
SLURM preemption (``preemption``). It uses the method (``lpc.losses``, ``lpc.latent``, ``lpc.policy``) and
the data, and knows nothing of evaluation or experiments."""
