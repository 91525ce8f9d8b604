"""`python -m services.refiner`: one refiner stage worker process."""

from livestage.serving.stage_worker import run_stage

if __name__ == "__main__":
    run_stage("refiner")
