"""`python -m services.encoder`: one encoder stage worker process."""

from livestage.serving.stage_worker import run_stage

if __name__ == "__main__":
    run_stage("encoder")
