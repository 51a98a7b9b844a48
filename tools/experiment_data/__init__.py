"""The experiment-data generators of ``tools/make_experiment_data.py`` (SPEC §5): corpora from
real text on the machine, the experiments built from them, and the checks their learned weights
must pass. Kept in tools/, out of the installed package: it is how the results' data was made."""
