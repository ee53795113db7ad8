"""dragon-launch (``launcher.launch:main``) and the job clean-up helpers it uses."""
