"""Composer glue: recipe -> objects -> Trainer.fit(). Entry point: `python -m dip_scale.train`."""
