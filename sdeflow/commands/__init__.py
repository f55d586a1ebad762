"""The subcommands of ``sdeflow`` (:mod:`sdeflow.cli`), one module per concern: swissroll, train,
evaluate (eval), sampling (sample, inpaint, denoise), metrics (classifier, fid). Argument parsing
only: every choice, default and rule comes from the library."""
