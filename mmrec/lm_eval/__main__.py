"""`python -m mmrec.lm_eval ARGS` = `lm_eval ARGS` with the model "mmrec" registered (see mmrec.lm_eval)."""
from mmrec.lm_eval import main

if __name__ == "__main__":
    main()
