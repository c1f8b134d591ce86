"""One module per stage of the experiment, each with ``run(wd, deadline=None) -> dict`` (the stage's record
in ``stages.json``). Stages hand over through the workdir only: none imports another."""
