"""Calibration: replay candidate policies over observations, bound the damage, recommend one."""
