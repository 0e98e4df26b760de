"""The VPPO algorithm: perturbation, token visual dependency, advantage shaping, gradient filtering, loss."""
