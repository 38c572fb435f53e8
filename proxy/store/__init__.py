"""The observation store: typed SQLAlchemy models, engine set-up and migrations."""
