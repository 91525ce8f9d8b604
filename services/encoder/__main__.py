"""`python -m services.encoder`: one encoder stage worker process."""

from livestage.serving.stages.worker import run_stage

if __name__ == "__main__":
    run_stage("encoder")
