"""`elasticd chaos`: run a job while injecting faults on a seeded schedule, and report.

The parts, one responsibility each:

* :mod:`.schedule` — the faults to inject: a pure function of the seed, the
  duration, the interval, the fault kinds and the targets;
* :mod:`.targets` — who the targets are: the local cluster's state file
  (``elasticd up`` writes it) or the agents registered in etcd;
* :mod:`.injectors` — how a fault is delivered: a signal to a local pid, or
  the InjectFault RPC of an agent started with ``--allow-chaos``;
* :mod:`.observer` — the job's step, loss, generation and workers, sampled
  several times a second;
* :mod:`.outcomes` — what each fault did (detected after, recovered after),
  decided from the samples alone;
* :mod:`.report` — report.json, report.md and report.png;
* :mod:`.runner` — the run itself; :mod:`.command` — its command line.
"""
