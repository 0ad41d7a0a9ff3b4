"""An RQ deployment run by workerkit: see docs/engines/rq.md."""
