def pytest_configure(config):
    config.addinivalue_line("markers", "docker: brings up the appliance on a real Docker engine (needs root and apt)")
