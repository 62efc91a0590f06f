"""safemerge entry point: ``python trainer.py {fit,validate,test,predict} --config CONFIG``."""

from safemerge.cli import main

if __name__ == "__main__":
    main()
