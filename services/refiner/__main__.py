"""`python -m services.refiner`: one refiner stage worker process."""

from livestage.serving.stages.worker import run_stage

if __name__ == "__main__":
    run_stage("refiner")
