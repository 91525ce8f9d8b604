"""`python -m services.session`: the public session API process."""

from livestage.serving.session.servicer import run_session_service

if __name__ == "__main__":
    run_session_service()
